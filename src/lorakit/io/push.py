"""`push_adapter(folder, repo_id)`: upload an adapter folder to the Hugging Face hub.

The folder is checked first, as `Adapter.read` checks it, so a broken adapter is refused before a byte
is sent; a folder without a model card gets one (io.model_card, from the train_config.json and
train_report.json beside the adapter). Only the files that describe the adapter are uploaded
(`UPLOADED`): never checkpoints/, data/, metrics or plots.

Through huggingface_hub: `HfApi.create_repo(exist_ok=True, private=...)`, `create_branch` for a
revision other than main, then `upload_folder` with only those files allowed. The token is `token`,
else HF_TOKEN or the saved login (`hf auth login`). Every failure is one line (PushError): no token, the
hub out of reach, the hub refusing the repository or the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lorakit.errors import LorakitError
from lorakit.io.adapter import WEIGHTS_NAME, Adapter
from lorakit.io.adapter_config import CONFIG_NAME
from lorakit.io.model_card import CARD_NAME, read_run_files, write_model_card
from lorakit.models.loading import HUB_ID

UPLOADED = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "train_config.json", "train_report.json")


class PushError(LorakitError):
    """An adapter folder could not be uploaded to the hub."""


def push_adapter(folder: Union[str, Path], repo_id: str, private: bool = False, token: Optional[str] = None, *,
                 revision: Optional[str] = None, commit_message: Optional[str] = None,
                 endpoint: Optional[str] = None) -> str:
    """Upload the adapter in `folder` to the hub repository `repo_id` (OWNER/NAME, created if missing) and
    return the repository's URL.

    private: create the repository private (an existing one keeps its visibility). revision: a branch
    (created if missing; default main). endpoint: another hub than huggingface.co (default: HF_ENDPOINT).
    """
    folder = Path(folder)
    if not HUB_ID.fullmatch(repo_id) or ".." in repo_id:
        raise PushError(f"{repo_id!r} is not a hub repository id; pass OWNER/NAME")
    Adapter.read(folder, allow_hub=False)  # a broken adapter is refused here, before anything is sent
    if not (folder / CARD_NAME).is_file():
        train_config, report = read_run_files(folder)
        write_model_card(folder, train_config=train_config, report=report, adapter_id=repo_id)
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(UPLOADED), revision=revision,
                          commit_message=commit_message or f"Upload the adapter {folder.name} with lorakit")
    except HfHubHTTPError as exc:
        raise PushError(f"the hub at {api.endpoint} refused {repo_id}: {_first_line(exc)}") from None
    except ValueError as exc:  # the hub's check of the model card's front matter, a bad revision name
        raise PushError(f"the hub at {api.endpoint} refused the upload to {repo_id}: {_first_line(exc)}") from None
    except Exception as exc:  # no network, DNS, TLS, a proxy: whatever the HTTP client raises
        raise PushError(f"could not reach the Hugging Face hub at {api.endpoint} ({type(exc).__name__}: "
                        f"{_first_line(exc)}); check the network connection") from None
    return str(url)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
