"""The image attention's forms (ipadapter_core.attention_forms), each forced where its device would not choose it."""
from __future__ import annotations

FORMS = ["extra heads", "per adapter", "key-major products", "head products"]  # attention_forms.FORMS (a test each)


def forced_plan(forms, form: str):
    """A plan that runs ``form`` (a name) as its device runs it: the GPU's form reading nothing back, the CPU's
    forms reading back (skipping gated-off groups, attending only a small mask's rows). ``forms``: the
    attention_forms module."""
    assert FORMS == [f.name for f in forms.FORMS]  # a new form gets its parity tests (test_ipadapter_parity)
    chosen, gpu = forms.FORMS[FORMS.index(form)], forms.attention_plan("cuda", 16, False)
    return gpu if chosen is gpu.form else forms.AttentionPlan(chosen, reads_back=True)
