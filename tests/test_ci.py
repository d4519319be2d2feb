"""CI is one thing in two places: every command `.ci/run` runs (a clean clone on a fresh machine) is a step of
the GitHub workflow, with the same install steps, and the workflow runs nothing `.ci/run` does not. The README's
test command is run verbatim by both."""

import re
import shlex

import yaml
from conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
# The job that builds and pushes the images on tags: it has no counterpart in .ci/run (no registry here).
PUBLISH_JOB = "publish"


def readme_test_command():
    """The second fenced command at the top of the README (the first runs the service)."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line.strip() for block in blocks[:2] for line in block.splitlines() if line.strip()]
    return next(c for c in commands if "pytest" in c)


def ci_run_commands():
    commands = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.split()[0] in {"set", "cd", "export"}:
            continue
        commands.append(line)
    return commands


def workflow_commands():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    commands = []
    for name, job in workflow["jobs"].items():
        if name == PUBLISH_JOB:
            continue
        for step in job["steps"]:
            if "run" in step:
                commands.extend(line.strip() for line in step["run"].splitlines() if line.strip())
    return commands


def words(command):
    tokens = shlex.split(command)
    return tokens[1:] if tokens[0] == "sudo" else tokens


def covers(step, command):
    """A workflow step runs a .ci/run command when it is that command, perhaps under sudo, perhaps with more
    arguments (`--pull-base`); `.ci/packages` is compared by its groups, which the jobs split between them."""
    step, command = words(step), words(command)
    return step[:len(command)] == command


def test_the_readme_test_command_is_run_verbatim_by_both():
    command = readme_test_command()
    assert command in ci_run_commands()
    assert command in workflow_commands()


def test_every_command_of_ci_run_is_a_workflow_step():
    steps = workflow_commands()
    for command in ci_run_commands():
        if words(command)[0] == ".ci/packages":
            continue
        assert any(covers(step, command) for step in steps), f"{command!r} (.ci/run) is not run by the workflow"


def test_the_workflow_runs_nothing_ci_run_does_not():
    commands = ci_run_commands()
    for step in workflow_commands():
        assert any(covers(step, command) for command in commands) or words(step)[0] == ".ci/packages", \
            f"{step!r} (workflow) is not run by .ci/run"


def test_the_same_system_packages_are_installed():
    def groups(commands):
        return {group for c in commands if words(c)[0] == ".ci/packages" for group in words(c)[1:]}
    assert groups(ci_run_commands()) == groups(workflow_commands()) == {"tests", "deploy", "image"}


def test_every_job_that_runs_a_ci_script_installs_its_packages_first():
    """A job's scripts need the packages of their group: the step installing them comes before anything else."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    for name, job in workflow["jobs"].items():
        if name == PUBLISH_JOB:
            continue
        runs = [words(step["run"]) for step in job["steps"] if "run" in step]
        assert runs[0][0] == ".ci/packages", f"job {name} does not start with .ci/packages"


def test_ci_scripts_are_executable():
    for path in (ROOT / ".ci").iterdir():
        assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
