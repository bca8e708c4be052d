"""Hugging Face hub ids as model names: `moe_infer.load("mistralai/Mixtral-8x7B-v0.1")`,
`moe-infer convert ORG/NAME DST`, `--model ORG/NAME`.

A name that is not a local directory but has the shape of a hub id is resolved the way
`from_pretrained` resolves it, through `huggingface_hub.snapshot_download`: the snapshot in the
local hub cache (`HF_HOME` / `HF_HUB_CACHE`) when it is there and the hub cannot be reached or
`HF_HUB_OFFLINE=1` is set; otherwise the files are downloaded into that cache, with
`huggingface_hub`'s progress bars. Only the files a safetensors checkpoint needs are fetched
(configs, tokenizer files, safetensors weights and their index): never pickled weights.
Owns nothing else: the directory it returns is read like any other model directory.
"""

from __future__ import annotations

import os
import re

from moe_infer.errors import MissingFile

# "org/name" (a revision is not part of the name: pass revision=). A bare "name" is not taken for a
# hub id: it is far more often a mistyped local or shipped model name than a legacy hub model.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.py"]


def is_hub_id(name: object) -> bool:
    """True when `name` has the shape of a hub repository id ("org/name") and is not an existing path."""
    return (isinstance(name, str) and bool(_HUB_ID.match(name)) and ".." not in name
            and not os.path.exists(name))


def resolve(name: str | os.PathLike, *, revision: str | None = None) -> str:
    """The local directory of model `name`: `name` itself when it is a directory, else the hub
    snapshot of the repository `name` (from the local cache, or downloaded).

    A name that is neither a directory nor a hub id raises `MissingFile`; a repository that is
    not in the cache while the hub cannot be reached, or that the hub does not have, raises
    `MissingFile` naming it and what to do.
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise MissingFile(f"{path!r} is not a directory (nor a hub id such as 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # transformers depends on it; a bare install may not have it
        raise MissingFile(f"{path!r} is not a directory; hub ids need huggingface_hub "
                          "(pip install huggingface_hub)") from None
    try:
        return snapshot_download(path, revision=revision, allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError:
        raise MissingFile(f"{path!r} is not a directory, and the hub repository {path} is not in the local hub "
                          f"cache while the hub cannot be reached (offline, or HF_HUB_OFFLINE=1): download it "
                          f"once online, or pass a local directory") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise MissingFile(f"{path!r} is not a directory, and the hub has no repository {path} that this "
                          f"account may read (a gated or private one needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise MissingFile(f"hub repository {path}: no revision {revision!r}") from None
    except (EntryNotFoundError, HfHubHTTPError) as err:
        raise MissingFile(f"hub repository {path}: {str(err).splitlines()[0]}") from None

