"""Where a model's files are: local folders and Hugging Face hub ids, resolved to one folder.

A hub id goes through the normal Hugging Face cache (``snapshot_download``), so a user with
network gets a download and an offline user (``HF_HUB_OFFLINE=1``) gets the cached snapshot.
Safetensors are preferred; pickle weights and remote code are refused unless asked for.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from merge_core.errors import BrmergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# What a merge needs from a hub repo: config, tokenizer, model card (for the licence) and
# weights. Pickle is fetched only on opt-in, so an untrusted .bin never lands on disk by default.
_HUB_PATTERNS = [
    "*.json", "*.txt", "*.model", "*.tiktoken", "README.md", "LICENSE*", "*.safetensors",
]
_HUB_PICKLE_PATTERNS = ["*.bin"]
# Subfolders hold other formats or variants (onnx/, original/, gguf/...): never the weights we read.
_HUB_IGNORE = ["*/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class SourceError(BrmergeError):
    """A model cannot be used as a merge source; the message names the model and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, with the weight files a merge will read."""

    ref: str
    path: Path
    revision: str | None
    weight_files: tuple[Path, ...]
    format: Literal["safetensors", "pickle"]
    # A dict copy (picklable, for Ray); excluded from eq/hash so sources stay hashable.
    config: Mapping[str, Any] = field(compare=False, hash=False, repr=False)
    # A LoRA adapter folder applied on read (``base+adapter`` or an adapter folder as the ref);
    # read the tensors through ``merge_core.lora.open_reader``, which applies it.
    adapter: Path | None = None

    def tensor_files(self) -> dict[str, Path]:
        """Tensor name -> the weight file holding it."""
        index = self.path / (SAFETENSORS_INDEX if self.format == "safetensors" else PICKLE_INDEX)
        if index.is_file():
            weight_map = _read_weight_map(index, ref=self.ref)
            return {name: self.path / fname for name, fname in weight_map.items()}
        found: dict[str, Path] = {}
        for file in self.weight_files:
            names = (
                safetensors_tensor_names(file) if self.format == "safetensors"
                else _pickle_tensor_names(file)
            )
            for name in names:
                if name in found:
                    raise SourceError(
                        f"model '{self.ref}': tensor '{name}' is in both {found[name].name} and "
                        f"{file.name}: remove the stray weight file from {self.path}"
                    )
                found[name] = file
        return found


def resolve_model(ref: str, *, revision: str | None = None, allow_pickle: bool = False,
                  cache_dir: str | Path | None = None,
                  trust_remote_code: bool = False) -> ModelSource:
    """Resolve a recipe's model reference: a local folder or ``org/name[@revision]``, or a
    LoRA adapter on a model (``model+adapter``, mergekit's syntax, or an adapter folder
    whose adapter_config.json names its base model)."""
    local = Path(ref).expanduser()
    if "+" in ref and not local.is_dir():
        parts = ref.split("+")
        if len(parts) != 2 or not all(parts):
            raise SourceError(f"model '{ref}': write a LoRA adapter on a model as model+adapter "
                              "(one '+')")
        base = resolve_model(parts[0], revision=revision, allow_pickle=allow_pickle, cache_dir=cache_dir,
                             trust_remote_code=trust_remote_code)
        if base.adapter is not None:
            raise SourceError(f"model '{ref}': '{parts[0]}' is itself an adapter: name its base model "
                              "before the '+'")
        adapter = _resolve_adapter(parts[1], cache_dir=cache_dir, allow_pickle=allow_pickle)
        return ModelSource(ref=ref, path=base.path, revision=base.revision, weight_files=base.weight_files,
                           format=base.format, config=base.config, adapter=adapter)
    if local.is_dir() and (local / ADAPTER_CONFIG).is_file() and not (local / "config.json").is_file():
        adapter = _resolve_adapter(ref, cache_dir=cache_dir, allow_pickle=allow_pickle)
        base_ref = _adapter_config(adapter, ref=ref).get("base_model_name_or_path")
        if not isinstance(base_ref, str) or not base_ref:
            raise SourceError(f"adapter '{ref}': its {ADAPTER_CONFIG} names no base_model_name_or_path: "
                              "write the recipe's model as base+adapter")
        base = resolve_model(base_ref, allow_pickle=allow_pickle, cache_dir=cache_dir,
                             trust_remote_code=trust_remote_code)
        return ModelSource(ref=ref, path=base.path, revision=base.revision, weight_files=base.weight_files,
                           format=base.format, config=base.config, adapter=adapter)
    if local.is_dir():
        if revision is not None:
            # Recording a revision nobody checked out would make the provenance lie.
            raise SourceError(f"model '{ref}' is a local folder, so revision '{revision}' cannot "
                              "be applied: check out that revision there, or drop it")
        path = local.resolve()
        rev = _local_revision(path)
    else:
        path, rev = _resolve_hub(ref, revision=revision, allow_pickle=allow_pickle,
                                 cache_dir=cache_dir)
    config = _read_config(path, ref=ref)
    if not trust_remote_code:
        _refuse_remote_code(path, config, ref=ref)
    fmt, files = _find_weights(path, ref=ref, allow_pickle=allow_pickle)
    return ModelSource(ref=ref, path=path, revision=rev, weight_files=files, format=fmt,
                       config=config)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def _resolve_adapter(ref: str, *, cache_dir: str | Path | None, allow_pickle: bool) -> Path:
    """A LoRA adapter folder (local, or a hub id fetched like a model) with its config and weights."""
    local = Path(ref).expanduser()
    if local.is_dir():
        path = local.resolve()
    else:
        path, _ = _resolve_hub(ref, revision=None, allow_pickle=allow_pickle, cache_dir=cache_dir,
                               patterns=_ADAPTER_PATTERNS)
    if not (path / ADAPTER_CONFIG).is_file():
        raise SourceError(f"adapter '{ref}' has no {ADAPTER_CONFIG} in {path}: point at a PEFT LoRA "
                          "adapter folder")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise SourceError(f"adapter '{ref}' has no {ADAPTER_WEIGHTS} in {path}: save the adapter with "
                          "safetensors (PEFT's default)")
    _adapter_config(path, ref=ref)
    return path


def _adapter_config(path: Path, *, ref: str) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"adapter '{ref}': {ADAPTER_CONFIG} is unreadable ({e}): re-save the adapter") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise SourceError(f"adapter '{ref}' is a {kind} adapter: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise SourceError(f"adapter '{ref}' is a DoRA adapter: merge it into its base with PEFT's "
                          "merge_and_unload first, then use that folder")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if config.get(key):
            raise SourceError(f"adapter '{ref}' uses {key}, which brmerge does not apply: merge it into "
                              "its base with PEFT's merge_and_unload first, then use that folder")
    return config


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (name -> dtype, shape, offsets), validated as strictly
    as the safetensors library does (``merge_core.safetensors_header``); no tensor data read."""
    from merge_core.safetensors_header import read_header

    return read_header(Path(path))[1]


def safetensors_tensor_names(path: Path) -> list[str]:
    return [k for k in read_safetensors_header(path) if k != "__metadata__"]


def hub_repo_id(path: Path) -> str | None:
    """``org/name`` when ``path`` is a snapshot folder of the Hugging Face cache, else None."""
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    return path.parent.parent.name[len("models--"):].replace("--", "/")


# --- hub -------------------------------------------------------------------------------------

def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; reading it again here honours a value
    # set later in the process (a Ray worker's runtime env, a test) instead of trying the network.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def _resolve_hub(ref: str, *, revision: str | None, allow_pickle: bool,
                 cache_dir: str | Path | None, patterns: list[str] | None = None) -> tuple[Path, str | None]:
    repo_id, _, ref_rev = ref.partition("@")
    if not _HUB_ID.match(repo_id) or ref.startswith((".", "~")):
        raise SourceError(f"model folder '{ref}' not found: check the path "
                          "(or give a hub id as org/name)")
    if ref_rev and revision and ref_rev != revision:
        raise SourceError(f"model '{ref}' names revision '{ref_rev}' but revision '{revision}' "
                          "was also given: keep only one")
    rev = ref_rev or revision

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    try:
        folder = snapshot_download(
            repo_id, revision=rev, cache_dir=cache,
            allow_patterns=patterns or _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else []),
            ignore_patterns=_HUB_IGNORE, local_files_only=offline,
        )
    except GatedRepoError as e:
        raise SourceError(f"model '{ref}' is gated on the Hugging Face Hub: accept its terms on "
                          f"https://huggingface.co/{repo_id} and log in with "
                          "`hf auth login`") from e
    except RepositoryNotFoundError as e:
        raise SourceError(f"model '{ref}' is not a local folder and was not found on the Hugging "
                          "Face Hub: check the path or id (log in with `hf auth login` if it is "
                          "private)") from e
    except RevisionNotFoundError as e:
        raise SourceError(f"revision '{rev}' of model '{repo_id}' was not found on the Hugging "
                          "Face Hub: check the branch, tag or commit") from e
    except LocalEntryNotFoundError as e:
        where = "offline (HF_HUB_OFFLINE is set)" if offline else "the Hub could not be reached"
        raise SourceError(f"model '{ref}' is not a local folder and is not (completely) in the "
                          f"Hugging Face cache, and {where}: download it with `hf download "
                          f"{repo_id}` while online, or fix the path") from e
    except HFValidationError as e:
        raise SourceError(f"model '{ref}' is neither a local folder nor a valid hub id: "
                          "check the path") from e
    path = Path(folder)
    return path, path.name if _COMMIT_SHA.match(path.name) else rev


def _local_revision(path: Path) -> str | None:
    """The commit of a cache snapshot folder or of a git checkout; None for a plain folder."""
    if hub_repo_id(path) is not None and _COMMIT_SHA.match(path.name):
        return path.name
    git = path / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if _COMMIT_SHA.match(head) else None
        name = head[len("ref: "):]
        loose = git / name
        if loose.is_file():
            return loose.read_text().strip() or None
        packed = git / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            sha, _, refname = line.partition(" ")
            if refname == name:
                return sha
    except OSError:
        pass  # not a git checkout (or a worktree whose .git is a file): no revision to record
    return None


# --- folder contents -------------------------------------------------------------------------

def _read_config(path: Path, *, ref: str) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError(f"model '{ref}' has no config.json in {path}: point at a Hugging Face "
                          "model folder (config.json plus weights)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"model '{ref}': config.json in {path} is unreadable ({e}): "
                          "re-download or fix it") from e
    if not isinstance(config, dict):
        raise SourceError(f"model '{ref}': config.json in {path} is not a JSON object: "
                          "re-download or fix it")
    return config


def _refuse_remote_code(path: Path, config: Mapping[str, Any], *, ref: str) -> None:
    # The merge itself never imports model code; this guards the places that build modules or
    # tokenizers from the folder, where transformers would otherwise need to run the repo's code.
    where = None
    if config.get("auto_map"):
        where = "config.json"
    else:
        tok_config = path / "tokenizer_config.json"
        try:
            if tok_config.is_file() and json.loads(tok_config.read_text("utf-8")).get("auto_map"):
                where = "tokenizer_config.json"
        except (OSError, ValueError, AttributeError):
            pass  # an unreadable tokenizer config is the tokenizer loader's problem, not ours
    if where:
        raise SourceError(f"model '{ref}' needs custom code ({where} has auto_map): use a model that "
                          "runs on transformers' built-in architectures (`brmerge merge` and `brmerge eval` "
                          "accept it with --trust-remote-code, if you trust it)")


def remote_code_files(path: Path) -> dict[str, Path]:
    """The code files (``name.py`` -> path) that the ``auto_map`` of ``path``'s config.json and
    tokenizer_config.json name, for a merge of a model accepted with ``--trust-remote-code``:
    copied beside the output's config, so the output loads exactly as its source did instead of
    naming modules it lacks. A reference into another repository (``repo--module.Class``) is
    fetched from there by transformers and needs no file; nothing here imports the code."""
    files: dict[str, Path] = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        refs: list[str] = []
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            refs += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
        for ref in refs:
            if "--" in ref or "." not in ref:
                continue
            module = ref.rsplit(".", 1)[0]
            code = path / (module.replace(".", "/") + ".py")
            if code.is_file() and path.resolve() in code.resolve().parents:
                files[code.relative_to(path).as_posix()] = code
    return files


def _find_weights(path: Path, *, ref: str,
                  allow_pickle: bool) -> tuple[Literal["safetensors", "pickle"], tuple[Path, ...]]:
    files = _safetensors_files(path, ref=ref)
    if files:
        return "safetensors", files
    pickles = _pickle_files(path, ref=ref)
    if not pickles:
        raise SourceError(f"model '{ref}' has no weights in {path} (no *.safetensors or "
                          "pytorch_model*.bin): point at a complete model folder")
    if not allow_pickle:
        if (path / PICKLE_INDEX).is_file():
            shown = PICKLE_INDEX
        else:
            more = f", +{len(pickles) - 2} more" if len(pickles) > 2 else ""
            shown = ", ".join(f.name for f in pickles[:2]) + more
        raise SourceError(f"model '{ref}' has only pickle weights ({shown}); pickle can run code "
                          "when loaded: convert it to safetensors (only `brmerge merge` reads pickle, with "
                          "--allow-pickle, if you trust it)")
    return "pickle", pickles


def _safetensors_files(path: Path, *, ref: str) -> tuple[Path, ...]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed_files(path, index, ref=ref)
    if (path / SAFETENSORS_SINGLE).is_file():
        return (path / SAFETENSORS_SINGLE,)
    return tuple(sorted(p for p in path.glob("*.safetensors") if p.is_file()))


def _pickle_files(path: Path, *, ref: str) -> tuple[Path, ...]:
    index = path / PICKLE_INDEX
    if index.is_file():
        return _indexed_files(path, index, ref=ref)
    if (path / PICKLE_SINGLE).is_file():
        return (path / PICKLE_SINGLE,)
    # Only the checkpoint's own shards: training_args.bin and friends are also *.bin.
    return tuple(sorted(p for p in path.glob("pytorch_model*.bin") if p.is_file()))


def _indexed_files(path: Path, index: Path, *, ref: str) -> tuple[Path, ...]:
    names = sorted(set(_read_weight_map(index, ref=ref).values()))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise SourceError(f"model '{ref}': {index.name} lists {missing[0]}, which is missing "
                          f"from {path} ({len(missing)} file(s) missing): re-download the model")
    return tuple(path / n for n in names)


def _read_weight_map(index: Path, *, ref: str) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise SourceError(f"model '{ref}': {index} is unreadable ({e}): re-download it") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"model '{ref}': {index} has no weight_map: re-download it")
    return {str(k): str(v) for k, v in weight_map.items()}


def _pickle_tensor_names(path: Path) -> list[str]:
    import torch

    # mmap + weights_only: no tensor data is read and no pickled code can run.
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for unreadable checkpoints
        raise SourceError(f"cannot read pickle weights {path} as plain tensors ({e}): "
                          "convert the checkpoint to safetensors") from e
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)]
