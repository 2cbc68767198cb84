"""Run an API-format workflow on a ComfyUI server and download the images it saves (Python standard library only).

    python tools/api_client.py workflows/api/sd15_ipadapter_prompt.json --server http://127.0.0.1:8188 \\
        --upload workflows/images/reference.png --out results/

--upload sends input images first (to the server's input folder, under their own names, as LoadImage
reads them). The script queues the workflow (POST /prompt), waits for its history entry (GET /history/ID),
downloads every saved image (GET /view) into --out and prints their paths. A workflow the server
refuses or fails prints the server's message and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def upload_image(server: str, path: Path) -> str:
    """POST /upload/image as multipart form data; returns the name the server stored it under."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode(), path.read_bytes(), f"\r\n--{boundary}--\r\n".encode()])
    request = urllib.request.Request(f"{server}/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["name"]


def queue(server: str, prompt: dict) -> str:
    request = urllib.request.Request(f"{server}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"the server refused the workflow (HTTP {err.code}): {err.read().decode(errors='replace')}")


def wait_for(server: str, prompt_id: str, timeout: float) -> dict:
    """The prompt's history entry once it has finished; RuntimeError with the server's message if it failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server}/history/{prompt_id}", timeout=60) as response:
            entry = json.loads(response.read()).get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") is not None:
            if status.get("status_str") == "error":
                errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = errors[0] if errors else {}
                raise RuntimeError(f"{detail.get('node_type')} (node {detail.get('node_id')}) failed: "
                                   f"{detail.get('exception_message', status)}")
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def download_images(server: str, entry: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_output in entry["outputs"].values():
        for image in node_output.get("images", []):
            query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{server}/view?{query}", timeout=60) as response:
                target = out / image["filename"]
                target.write_bytes(response.read())
            saved.append(target)
    return saved


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="an API-format workflow (the UI's Export (API))")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="the ComfyUI server's address")
    parser.add_argument("--upload", type=Path, nargs="*", default=[], help="input images to send first")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the downloaded images")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the workflow")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")
    try:
        for image in args.upload:
            upload_image(server, image)
        entry = wait_for(server, queue(server, json.loads(args.workflow.read_text())), args.timeout)
    except (RuntimeError, TimeoutError) as err:
        print(err, file=sys.stderr)
        return 1
    for path in download_images(server, entry, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
