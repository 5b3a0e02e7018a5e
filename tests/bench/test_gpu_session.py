"""bench/gpu_session.sh: each of its parts (tests, benches, 8b) must fit one device-tool call of at most 600 s: its
steps' time limits, with the install before them, leave the call time to return what was measured."""
import pathlib
import re

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"
CALL_LIMIT_S = 600
INSTALL_S = 40   # nvidia-smi, the carried wheels and the editable install of fastalign, before the first step


def step_limits(text):
    """Each part's `step SECONDS NAME ...` limits: {"tests": [...], "benches": [...], "8b": [...]}."""
    pattern = re.compile(r"^\s*step (\d+) ", re.MULTILINE)
    tests = text.split("gpu_tests() {")[1].split("\n}\n")[0]
    benches = text.split("gpu_benches() {")[1].split("\n}\n")[0]
    eight_b = text.split("        8b)")[1].split(";;")[0]
    return {name: [int(n) for n in pattern.findall(part)]
            for name, part in (("tests", tests), ("benches", benches), ("8b", eight_b))}


def test_every_session_fits_one_device_call():
    limits = step_limits(SCRIPT.read_text())
    assert [len(v) for v in limits.values()] == [2, 6, 1], limits
    for name, part in limits.items():
        assert INSTALL_S + sum(part) <= CALL_LIMIT_S, (name, part)
