"""bench/gpu_session.sh must fit one device-tool call of at most 600 s: its steps' time limits, with the install
before them, leave the call time to return what was measured."""
import pathlib
import re

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"
CALL_LIMIT_S = 600
INSTALL_S = 40   # nvidia-smi, the carried wheels and the editable install of fastalign, before the first step


def step_limits(text):
    """The time limit of each `step SECONDS NAME ...` line, the full session's and the 8B session's apart."""
    full, eight_b = text.split('if [[ "${1:-}" == "8b" ]]; then')[1].split("return", 1)[::-1]
    pattern = re.compile(r"^\s*step (\d+) ", re.MULTILINE)
    return [int(n) for n in pattern.findall(full)], [int(n) for n in pattern.findall(eight_b)]


def test_every_session_fits_one_device_call():
    full, eight_b = step_limits(SCRIPT.read_text())
    assert len(full) == 6 and len(eight_b) == 1, (full, eight_b)
    for limits in (full, eight_b):
        assert INSTALL_S + sum(limits) <= CALL_LIMIT_S, limits
