"""The deployment files under cluster/ agree with the project: every manifest parses, the
entrypoints name modules and configs that exist (each config passes --dry-run), the Serve app and
its arguments are the ones ``nitro_dist.serve`` defines, the Ray / DeepSpeed / diffusers versions
they pin equal pyproject.toml's, the runtime env leaves big local folders behind, and the README
names every file. No Ray is started and no model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from nitro_dist.config import load_config, resolve_preset
from nitro_dist.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
# The Serve app arguments the manifests give (the builder accepts more, with defaults).
SERVE_ARGS = {
    "checkpoint",
    "replicas",
    "max_batch_size",
    "batch_wait_ms",
    "device",
    "dtype",
    "max_ongoing_requests",
}
# Local folders that must never be uploaded as part of a job's working_dir.
BIG_LOCAL = [".venv", "runs", "tune_runs", "wandb", ".whl", ".git"]


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(name: str) -> dict:
    (doc,) = docs(CLUSTER / name)
    return doc


def kuberay(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def pinned_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return specs[0].version
    return None


RAY_VERSION = pinned_version(pyproject_requirements()["ray"])


def runtime_envs() -> list[tuple[str, dict]]:
    """(where, runtime env) for every runtime env the cluster files give."""
    out = [("cluster/runtime_env.yaml", one("runtime_env.yaml"))]
    for p, job in kuberay("RayJob"):
        out.append((f"{rel(p)} runtimeEnvYAML", yaml.safe_load(job["spec"]["runtimeEnvYAML"])))
    for where, app in serve_apps():
        if app.get("runtime_env"):
            out.append((f"{where} app {app['name']}", app["runtime_env"]))
    return out


def serve_configs() -> list[tuple[str, dict]]:
    """(where, Serve config) from cluster/serve_config.yaml and every RayService."""
    out = [("cluster/serve_config.yaml", one("serve_config.yaml"))]
    for p, svc in kuberay("RayService"):
        out.append((f"{rel(p)} serveConfigV2", yaml.safe_load(svc["spec"]["serveConfigV2"])))
    return out


def serve_apps() -> list[tuple[str, dict]]:
    return [(where, app) for where, cfg in serve_configs() for app in cfg["applications"]]


def entrypoints() -> list[tuple[str, str]]:
    """(where, command) for every training command: RayJob entrypoints and the README's
    `ray job submit ... -- <command>` lines."""
    out = [(rel(p), job["spec"]["entrypoint"]) for p, job in kuberay("RayJob")]
    for line in readme_section().splitlines():
        if line.strip().startswith("ray job submit"):
            out.append(("README.md", line.split(" -- ", 1)[1]))
    return out


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Run on a cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Run on a cluster' section"
    return m.group(1)


def ray_clusters() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of every RayJob and RayService."""
    out = [(rel(p), job["spec"]["rayClusterSpec"]) for p, job in kuberay("RayJob")]
    out += [(rel(p), svc["spec"]["rayClusterConfig"]) for p, svc in kuberay("RayService")]
    return out


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def worker_gpus(spec: dict) -> int:
    total = 0
    for g in spec["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            total += gpus * int(g.get("replicas", 1))
    return total


# ---------------------------------------------------------------------------------------------


def test_every_manifest_parses_and_the_expected_ones_exist():
    names = {rel(p) for p in YAMLS}
    assert {
        "cluster/aws.yaml",
        "cluster/runtime_env.yaml",
        "cluster/serve_config.yaml",
        "cluster/kuberay/rayjob-train.yaml",
        "cluster/kuberay/rayservice-serve.yaml",
    } <= names
    for p in YAMLS:
        assert docs(p), f"{rel(p)} is empty"
    for where, env in runtime_envs():
        assert isinstance(env, dict), where
    for where, cfg in serve_configs():
        assert cfg.get("applications"), where
    assert kuberay("RayJob") and kuberay("RayService")
    for _, d in kuberay("RayJob") + kuberay("RayService"):
        assert d["apiVersion"] == "ray.io/v1"


def test_aws_launcher_config_matches_rays_schema_and_installs_the_project():
    import jsonschema
    import ray.autoscaler

    cfg = one("aws.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [
        t
        for t in types.values()
        if re.match(r"(p4|p5|g5|g6)", t["node_config"]["InstanceType"])
        and t.get("max_workers", 0) >= 1
    ]
    assert gpu_types, "no GPU worker node type"
    assert cfg["docker"]["image"].endswith("-gpu")
    # the repository is synced to the nodes and installed from there (pyproject's pins follow)
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    installs = [shlex.split(c) for c in cfg["setup_commands"] if "pip install" in c]
    assert any(["-e", remote] == c[-2:] for c in installs), "setup_commands never install the repo"
    # what rsync leaves behind
    ignored = (ROOT / ".gitignore").read_text().split()
    for folder in (".venv", "runs", "wandb"):
        assert f"{folder}/" in ignored and ".gitignore" in cfg["rsync_filter"]
    for folder in (".git", ".whl", "tune_runs"):
        assert folder in cfg["rsync_exclude"]


def test_entrypoints_name_package_modules_and_configs_that_pass_dry_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the working dir a job runs in is the repository root
    found = entrypoints()
    assert any(w == "README.md" for w, _ in found) and any(w != "README.md" for w, _ in found)
    for where, command in found:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"], f"{where}: {command}"
        module = argv[2]
        assert module.startswith("nitro_dist.") and importlib.util.find_spec(module), module
        assert module == "nitro_dist.train", f"{where}: only training entrypoints are expected"
        args = argv[3:]
        config = args[args.index("--config") + 1]
        if config.endswith((".yaml", ".yml")):
            assert (ROOT / config).is_file(), f"{where}: {config} is not in the repository"
        resolve_preset(config)
        assert train_main([*args, "--dry-run"]) == 0, f"{where}: --dry-run failed"
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["distributed"]["use_gpu"] is True, f"{where}: trains on GPUs"


def test_rayjob_has_gpus_for_the_workers_its_config_asks_for():
    for p, job in kuberay("RayJob"):
        args = shlex.split(job["spec"]["entrypoint"])[3:]
        config = args[args.index("--config") + 1]
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        d = load_config(str(ROOT / config), overrides).distributed
        need = d.num_workers * d.gpus_per_worker
        assert worker_gpus(job["spec"]["rayClusterSpec"]) >= need, rel(p)


def test_serve_apps_reference_the_serve_module_and_its_arguments():
    from ray.serve.schema import ServeDeploySchema

    configs = serve_configs()
    assert len(configs) >= 2
    apps = []
    for where, cfg in configs:
        ServeDeploySchema.model_validate(cfg)  # what `serve deploy` / KubeRay check first
        for app in cfg["applications"]:
            module_name, _, attr = app["import_path"].partition(":")
            assert app["import_path"] == "nitro_dist.serve:app", where
            path = ROOT / (module_name.replace(".", "/") + ".py")
            assert path.is_file(), f"{where}: {rel(path)} does not exist"
            assert set(app["args"]) == SERVE_ARGS, where
            assert app["args"]["device"] == "cuda" and app["args"]["dtype"] == "bf16", where
            assert "PLACEHOLDER" in app["args"]["checkpoint"], where
            deployments = {d["name"]: d for d in app.get("deployments", [])}
            assert set(deployments) <= {"Generator"}, where  # the one deployment
            assert deployments["Generator"]["ray_actor_options"]["num_gpus"] >= 1, where
            apps.append((module_name, attr, app))
    # serve_config.yaml and the RayService deploy the same application
    first = apps[0][2]
    for _, _, app in apps[1:]:
        assert app["import_path"] == first["import_path"]
        assert app["args"] == first["args"]
        assert app["deployments"] == first["deployments"]
    module = importlib.import_module(apps[0][0])
    assert callable(getattr(module, apps[0][1]))
    assert set(SERVE_ARGS) <= set(module.APP_ARGS), "the manifests give arguments serve refuses"


def test_rayservice_has_a_gpu_for_every_generator_replica():
    for p, svc in kuberay("RayService"):
        (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        gen = {d["name"]: d for d in app["deployments"]}["Generator"]
        need = app["args"]["replicas"] * gen["ray_actor_options"]["num_gpus"]
        assert worker_gpus(svc["spec"]["rayClusterConfig"]) >= need, rel(p)


def test_versions_in_manifests_equal_pyproject_pins():
    reqs = pyproject_requirements()
    assert RAY_VERSION and pinned_version(reqs["deepspeed"]) and pinned_version(reqs["diffusers"])
    pins = {name: pinned_version(r) for name, r in reqs.items() if pinned_version(r)}
    for p in YAMLS:
        text = p.read_text()
        # every "pkg==X" / "pkg[extras]==X" written anywhere (commands, comments, pip lists)
        for name, version in pins.items():
            pattern = rf"(?<![\w.-]){re.escape(name)}(\[[^\]]*\])?==([\w.]+)"
            for m in re.finditer(pattern, text, re.I):
                assert m.group(2) == version, f"{rel(p)}: {m.group(0)}, pyproject: =={version}"
        for tag in re.findall(r"rayproject/ray(?:-ml)?:([\w.]+?)(?:-|\s|$)", text):
            assert tag == RAY_VERSION, f"{rel(p)}: image rayproject/ray:{tag}"
    for where, spec in ray_clusters():
        assert spec["rayVersion"] == RAY_VERSION, where
        for c in containers(spec):
            assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), where
            assert c["image"].endswith("-gpu"), where
    assert one("aws.yaml")["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")


def test_runtime_env_pip_lists_carry_pyproject_requirements():
    reqs = pyproject_requirements()
    with_pip = [(w, env) for w, env in runtime_envs() if env.get("pip")]
    assert with_pip, "the KubeRay runtime envs install the dependencies with pip"
    for where, env in with_pip:
        pip = env["pip"]
        packages = pip["packages"] if isinstance(pip, dict) else pip
        given = {canonicalize_name(Requirement(s).name): Requirement(s) for s in packages}
        # the image brings Ray (its tag is checked above); everything else must be listed
        assert set(reqs) - {"ray"} <= set(given), f"{where}: missing {set(reqs) - set(given)}"
        for name, req in given.items():
            assert name in reqs, f"{where}: {req} is not a project dependency"
            version = pinned_version(req)
            if version is not None:  # a pin must satisfy (or equal) pyproject's requirement
                assert reqs[name].specifier.contains(version), f"{where}: {req} vs {reqs[name]}"
            else:
                assert req.specifier == reqs[name].specifier, f"{where}: {req} vs {reqs[name]}"
    # the setup commands' pins satisfy pyproject too (torch: the version the Makefile installs)
    for command in one("aws.yaml")["setup_commands"]:
        if "pip install" not in command:
            continue
        for req in (Requirement(t) for t in shlex.split(command) if "==" in t):
            assert reqs[canonicalize_name(req.name)].specifier.contains(pinned_version(req)), req


def test_runtime_envs_exclude_big_local_folders_and_share_env_vars():
    from ray._private.thirdparty.pathspec import PathSpec
    from ray.runtime_env import RuntimeEnv

    base = one("runtime_env.yaml")
    RuntimeEnv(**base)  # Ray's own validation of the fields
    assert base["working_dir"] == "."
    spec = PathSpec.from_lines("gitwildmatch", base["excludes"])  # how Ray applies excludes
    for folder in BIG_LOCAL:
        assert spec.match_file(f"{folder}/some/file"), f"{folder}/ would be uploaded"
    assert spec.match_file("dist/nitro_dist-0.1.0-py3-none-any.whl")
    for keep in ("nitro_dist/train.py", "configs/sdxl_realism.yaml", "cluster/aws.yaml"):
        assert not spec.match_file(keep), f"{keep} would be left behind"
    assert base["env_vars"]["WANDB_MODE"] == "offline"
    assert base["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    for where, env in runtime_envs()[1:]:
        RuntimeEnv(**env)
        assert env["env_vars"] == base["env_vars"], where
        wd = env.get("working_dir")
        assert wd is None or wd.startswith("s3://PLACEHOLDER"), f"{where}: remote working_dir"


def test_readme_section_names_every_manifest_and_real_cli_flags():
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    section = readme_section()
    for p in YAMLS:
        assert rel(p) in section, f"README 'Run on a cluster' does not name {rel(p)}"
    commands = [ln.strip() for ln in section.splitlines()]
    for needed in (
        "ray up cluster/aws.yaml",
        "ray down cluster/aws.yaml",
        "serve deploy cluster/serve_config.yaml",
        "kubectl apply -f cluster/kuberay/rayjob-train.yaml",
        "kubectl apply -f cluster/kuberay/rayservice-serve.yaml",
    ):
        assert any(c.startswith(needed) for c in commands), needed
    (submit,) = [c for c in commands if c.startswith("ray job submit")]
    assert "--working-dir . --runtime-env cluster/runtime_env.yaml" in submit
    clis = {
        "ray job submit": ray_cli.commands["job"].commands["submit"],
        "ray up": ray_cli.commands["up"],
        "ray down": ray_cli.commands["down"],
        "ray dashboard": ray_cli.commands["dashboard"],
        "serve deploy": serve_cli.commands["deploy"],
    }
    for prefix, command in clis.items():
        options = {o for p in command.params for o in p.opts}
        for line in (c for c in commands if c.startswith(prefix + " ")):
            head = line.split(" -- ", 1)[0].split("#", 1)[0]
            for flag in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", head):
                assert flag in options, f"`{prefix}` has no option {flag} (Ray {RAY_VERSION})"


@pytest.mark.parametrize(
    "config", ["sdxl_realism", "sdxl_vibrant", "sdxl_1gpu", "configs/sdxl_vibrant.yaml"]
)
def test_sdxl_preset_dry_run_prints_the_config_without_ray_or_models(config):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nitro_dist.train"]
        + ["--config", config, "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["run_name"] == Path(config).stem
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if "|" in ln}
    assert "nitro_dist.config" in imported  # -X importtime listed the imports
    for heavy in ("ray", "deepspeed", "diffusers", "transformers"):
        assert not {m for m in imported if m == heavy or m.startswith(heavy + ".")}, heavy


def test_sdxl_presets_follow_the_paper():
    realism, vibrant = load_config("sdxl_realism"), load_config("sdxl_vibrant")
    one_gpu = load_config("sdxl_1gpu")
    for cfg in (realism, vibrant, one_gpu):
        p = cfg.pool
        sdxl_levels = 10  # down-block skips + mid of SDXL's UNet (pool.levels empty = all)
        assert len(p.kinds) * len(p.t_buckets) * sdxl_levels * p.candidates == 480
        assert p.refresh_rate == 0.01 and p.t_buckets == [10, 250, 500, 750]
        assert not p.levels
        assert cfg.model.source == "diffusers" and cfg.data.source == "shards"
        for path in (cfg.model.teacher_path, cfg.model.student_path, cfg.data.shards):
            assert "PLACEHOLDER" in path
        assert "PLACEHOLDER" in cfg.distributed.storage_path
        d, t = cfg.distributed, cfg.train
        assert d.use_gpu and d.zero_stage in (1, 2, 3) and t.precision == "bf16"
        assert t.batch_size % (d.num_workers * t.grad_accum) == 0
    assert realism.sampler.shift == 250 and vibrant.sampler.shift == 500
    assert realism.teacher.scheduler == "LCMScheduler" and realism.teacher.num_steps == 4
    assert realism.teacher.timesteps == [999, 749, 499, 249]
    assert vibrant.teacher.scheduler == "DDIMScheduler" and vibrant.teacher.num_steps == 8
    assert vibrant.teacher.scheduler_overrides["timestep_spacing"] == "trailing"
    assert "dmd2" in realism.model.student_path and "hyper-sdxl" in vibrant.model.student_path
    # the paper's one-GPU recipe: micro-batch 5 x gradient accumulation 20, bf16, activation
    # checkpointing; G's AdamW state offloaded (its memory plan: results/memory_plan_sdxl_1gpu.md)
    t, d = one_gpu.train, one_gpu.distributed
    assert d.num_workers == 1 and t.grad_accum == 20 and t.batch_size // t.grad_accum == 5
    assert one_gpu.model.gradient_checkpointing and one_gpu.optim.offload == "cpu"


# --- secure defaults: token auth on every node, dashboard on the head only, NetworkPolicy ------


def test_every_node_uses_token_auth_and_no_token_is_written_down():
    from packaging.version import Version

    aws = one("aws.yaml")
    options = " ".join(aws["docker"]["run_options"])
    assert re.search(r"(--env|-e) RAY_AUTH_MODE=token\b", options), "containers: no token auth"
    # the token comes from the launcher's machine, not from the repository or this file
    (local,) = [src for dst, src in aws["file_mounts"].items() if dst == "~/.ray/auth_token"]
    assert local == "~/.ray/auth_token"
    for command in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command, command
    for where, spec in ray_clusters():
        assert spec["authOptions"] == {"mode": "token"}, where  # KubeRay: Secret + env per pod
        assert Version(spec["rayVersion"]) >= Version("2.52"), where  # token auth's first release
        for c in containers(spec):
            env = {e["name"]: e for e in c.get("env", [])}
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), f"{where}: token in the file"
    for p in YAMLS:
        text = p.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?\w", text), rel(p)
        assert not re.search(r"^\s*auth_token\s*:", text, re.M), f"{rel(p)}: a Secret's token"
    # the README's launcher commands turn token auth on before `ray up` and generate the token
    commands = [ln.split("#", 1)[0].strip() for ln in readme_section().splitlines()]
    up = commands.index("ray up cluster/aws.yaml")
    assert "export RAY_AUTH_MODE=token" in commands[:up]
    assert "ray get-auth-token --generate > /dev/null" in commands[:up]


def test_dashboard_is_not_exposed_beyond_the_aws_head():
    from ray.scripts.scripts import cli as ray_cli

    start = ray_cli.commands["start"]
    (host_opt,) = [p for p in start.params if "--dashboard-host" in p.opts]
    assert host_opt.default in ("127.0.0.1", "localhost"), host_opt.default  # Ray's default
    aws = one("aws.yaml")
    for command in aws["head_start_ray_commands"]:
        hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
        assert set(hosts) <= {"127.0.0.1", "localhost"}, command
    # reached through `ray dashboard`'s SSH tunnel; the security group is the launcher's default
    assert "security_group" not in json.dumps(aws["provider"]).lower()
    section = readme_section()
    assert "ray dashboard cluster/aws.yaml" in section
    for line in section.splitlines():
        if line.startswith(("ray job submit", "serve deploy")):
            assert "--address http://127.0.0.1:8265" in line, line


def admits(policy: dict, labels: dict[str, str], port: int, namespace_labels=None) -> bool:
    """Whether a NetworkPolicy's ingress rules let a pod with ``labels`` (in the policy's
    namespace unless ``namespace_labels``) reach ``port`` on a selected pod (Kubernetes'
    semantics for matchLabels peers and TCP port lists)."""

    def selects(selector: dict | None, have: dict) -> bool:
        return selector is not None and all(
            have.get(k) == v for k, v in selector.get("matchLabels", {}).items()
        )

    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if not peers:  # no `from`: every source
            return True
        for peer in peers:
            same_ns = "namespaceSelector" not in peer and namespace_labels is None
            ns_ok = same_ns or selects(peer.get("namespaceSelector"), namespace_labels or {})
            if ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], labels)):
                return True
    return False


def test_networkpolicy_admits_only_ray_pods_the_operator_the_submitter_and_serve():
    (policy,) = docs(CLUSTER / "kuberay" / "networkpolicy.yaml")
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    ray_pod = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    (job,) = [job for _, job in kuberay("RayJob")]
    submitter = {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    stranger: dict[str, str] = {"app": "something-else"}
    system = {"kubernetes.io/metadata.name": "kuberay-system"}
    ports = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "agent": 52365}
    for name, port in ports.items():
        assert admits(policy, ray_pod, port), name
        assert admits(policy, stranger, port) == (name == "serve"), name
        assert admits(policy, stranger, port, system) == (name == "serve"), name
        assert admits(policy, operator, port, system) == (name in ("dashboard", "agent", "serve"))
        assert admits(policy, submitter, port) == (name in ("dashboard", "serve")), name
    assert admits(policy, ray_pod, 43219)  # workers' and object managers' random ports
    # the ports the manifests open on the head are the ones the policy speaks of
    for where, spec in ray_clusters():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in head["ports"]} <= set(ports.values()), where
