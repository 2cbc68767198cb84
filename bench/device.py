"""The GPU benches on a lent device machine, in one call; what that machine lacks is gathered here first.

The machine has its own Python (3.12, x86_64) with torch and most of the host's requirements, and no network.
``bundle`` writes ``.device/`` (ignored by git, about 42 MB): ``wheels/`` with the pinned host's wheel (from
which ``tools.comfy_host`` unpacks ComfyUI there, as here) and the wheels of the host's requirements that the
machine's image lacks, at the versions of tools/requirements-lock.txt; ``cubiq_pack/``, a copy of an unpacked
ComfyUI_IPAdapter_plus to compare with (never committed). ``run`` installs those wheels there, offline, and
runs ``RUNS`` in order (SD1.5 first, the reduced Flux, SDXL, the longest, last), each result and one log into $OUT:

    .venv/bin/python -m bench.device bundle --cubiq /tmp/cubiq_pack                 # here
    run(command="python3 -m bench.device run", carry=[".device"], timeout_s=540)     # there
    .venv/bin/python -m bench.device take <files_at> && .venv/bin/python -m bench.report   # here again

``run --check`` takes the same steps on this machine's CPU with the tiny models and a few steps: a check of the
bundle and of the commands, not a measurement. Run it with an interpreter whose environment holds only what the
device image holds (``torch torchvision numpy einops safetensors transformers tokenizers sentencepiece aiohttp
yarl pyyaml pillow scipy tqdm psutil requests``, no pydantic), so that a missing wheel shows here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools import comfy_host

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT / ".device"
LOCK = REPO_ROOT / "tools" / "requirements-lock.txt"
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The host's requirements that the device image lacks and the benches import (comfy.k_diffusion: torchsde;
# comfy_api.latest, which this pack's nodes use: av). Its other missing ones (kornia, spandrel, alembic,
# SQLAlchemy, pydantic, the frontend packages) only keep some built-in node modules or the server from loading.
# What these three need in turn (numpy, scipy, torch) is in the image.
MISSING_ON_DEVICE = ("torchsde", "trampoline", "av")
CUBIQ = ("--cubiq", ".device/cubiq_pack")
TINY_STEPS = ("--model", "tiny", "--size", "64", "--steps", "3", "--rounds", "1", "--cpu", *CUBIQ)  # gpu_step's check
RUNS = (  # result file, bench module, its arguments there, its arguments for --check
    ("gpu_step_sd15_512.json", "bench.gpu_step", ("--model", "sd15", "--size", "512", "--steps", "30", "--rounds", "5",
                                                 *CUBIQ), TINY_STEPS),
    ("edit_guider_full_512_gpu.json", "bench.edit_guider", ("--unet", "full", "--size", "512", "--rounds", "20",
                                                            "--device"),
     ("--unet", "tiny", "--size", "64", "--rounds", "1", "--device")),
    ("flux_budget_gpu.json", "bench.flux_budget", ("--device", "--rounds", "20"), ("--rounds", "1")),
    ("sd35_budget_gpu.json", "bench.sd35_budget", ("--device", "--rounds", "20"), ("--rounds", "1")),
    ("gpu_step_sdxl_1024.json", "bench.gpu_step", ("--model", "sdxl", "--size", "1024", "--steps", "20", "--rounds",
                                                  "3", *CUBIQ), TINY_STEPS),
)


def pinned(name: str) -> str:
    """``name==version`` as tools/requirements-lock.txt pins it."""
    for line in LOCK.read_text().splitlines():
        if line.split("==")[0].lower().replace("_", "-") == name.lower():
            return line.strip()
    raise KeyError(f"{name} is not pinned in {LOCK}")


def bundle(cubiq: Path) -> Path:
    """Write ``.device/``: the wheels (for the device's Python) and a copy of ComfyUI_IPAdapter_plus."""
    if not (cubiq / "CrossAttentionPatch.py").is_file():
        raise FileNotFoundError(f"--cubiq {cubiq}: not an unpacked ComfyUI_IPAdapter_plus (no CrossAttentionPatch.py)")
    wheels = BUNDLE / "wheels"
    shutil.rmtree(BUNDLE, ignore_errors=True)
    wheels.mkdir(parents=True)
    platforms = [arg for platform in DEVICE_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, *platforms, "-d", str(wheels), comfy_host.HOST_WHEEL,
                    *map(pinned, MISSING_ON_DEVICE)], check=True)
    shutil.copytree(cubiq, BUNDLE / "cubiq_pack", ignore=shutil.ignore_patterns("examples", ".git"))
    return BUNDLE


def run(out: Path, check: bool) -> int:
    """Install the bundle's wheels (no network), unpack the host, then each of ``RUNS`` into ``out``; the
    output of every step goes to this process's output and to ``out/device_run.log``. Returns the number of
    runs that failed (a failed run does not stop the next)."""
    if not (BUNDLE / "wheels").is_dir():
        raise FileNotFoundError(f"{BUNDLE / 'wheels'}: missing; run `python -m bench.device bundle` here first "
                                f"and carry .device")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", "/tmp/device-cache"))  # the host, the factory's models, the wheels
    site = cache / "site-packages"  # the wheels go here, beside the image's own environment, which stays as it is
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(BUNDLE / "wheels"), PYTHONUNBUFFERED="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", XDG_CACHE_HOME=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    failed, started = 0, time.monotonic()
    with open(out / "device_run.log", "w") as log:
        def tell(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            log.flush()  # what a run cut off at its time limit had printed still comes back

        def step(*command: str) -> int:
            tell(f"$ {' '.join(command)}\n")
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                tell(line)
            code = process.wait()
            tell(f"exit {code} at {time.monotonic() - started:.0f} s\n")
            return code

        python = sys.executable
        if shutil.which("nvidia-smi"):
            step("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
        if step(python, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(site),
                *map(pinned, MISSING_ON_DEVICE)) or \
                step(python, "-m", "tools.comfy_host", "install"):
            return len(RUNS)
        for result, module, arguments, check_arguments in RUNS:
            failed += bool(step(python, "-m", module, *(check_arguments if check else arguments),
                                "--out", str(out / result)))
    return failed


def take(files_at: Path) -> list[Path]:
    """Copy the results a device run brought back into bench/results/."""
    return [Path(shutil.copy(files_at / result, REPO_ROOT / "bench" / "results" / result))
            for result, *_ in RUNS if (files_at / result).is_file()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bundle", help="here: write .device/").add_argument(
        "--cubiq", type=Path, required=True, help="an unpacked ComfyUI_IPAdapter_plus folder")
    on_device = commands.add_parser("run", help="there: install the bundle and run the benches")
    on_device.add_argument("--check", action="store_true", help="tiny models on this machine's CPU")
    on_device.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", BUNDLE / "out")))
    commands.add_parser("take", help="here: copy a device run's results into bench/results/").add_argument(
        "files_at", type=Path)
    args = parser.parse_args(argv)
    if args.command == "bundle":
        folder = bundle(args.cubiq)
        print(f"{folder}: {sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
    elif args.command == "run":
        return min(run(args.out, args.check), 1)
    else:
        for path in take(args.files_at):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
