from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "README opens with exactly two commands: the main job, then the tests"
    assert commands[0].endswith("python -m experiments.sentiment --workdir runs/sentiment"), "the main job"
    test_command = commands[1]
    assert "pytest" in test_command and "PJLM_REQUIRE_HF=1" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
