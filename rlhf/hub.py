"""Publishing a stage's output on the Hugging Face Hub (`hub.push_to_hub`, `hub.model_id`).

`check_hub` runs before a stage loads anything: with the hub unreachable (HF_HUB_OFFLINE=1, no
network) or no token, a push at the end could only fail, after hours of training, so the run is
refused at once with one line. `push_output` uploads the finished directory (weights, tokenizer,
README.md model card, manifest, eval.json), never the resumable checkpoints or the lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session

from rlhf.config import HubConfig

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of a boolean environment variable
REACH_TIMEOUT = 5.0  # seconds: the hub answers a HEAD in well under a second when it is reachable
# what a push leaves out: training state (optimizer, RNG; large and of no use to a user), the run's lock,
# atomic writes in flight
NOT_PUSHED = ["checkpoints/*", ".lock", ".*.tmp*", "**/.*.tmp*"]


class HubError(RuntimeError):
    """The hub cannot take the push: one line saying why and what to do."""


def hub_endpoint() -> str:
    # read at call time, not huggingface_hub's copy made at import: tests and wrappers set it later
    return os.environ.get("HF_ENDPOINT", hub_constants.ENDPOINT).rstrip("/")


def check_hub(hub: HubConfig) -> None:
    """Refuse a push that cannot happen: offline mode, an endpoint that does not answer, no login."""
    if not hub.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        raise HubError(
            f"hub.push_to_hub: the Hugging Face Hub is unreachable (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}); "
            "unset HF_HUB_OFFLINE or set hub.push_to_hub=false"
        )
    endpoint = hub_endpoint()
    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT)
    except Exception as e:  # requests / httpx raise several types (DNS, refused, time-out, proxy)
        host = urlparse(endpoint).netloc or endpoint
        raise HubError(
            f"hub.push_to_hub: the Hugging Face Hub is unreachable ({host}: {type(e).__name__}); "
            "check the network or set hub.push_to_hub=false"
        ) from None
    if get_token() is None:
        raise HubError("hub.push_to_hub: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN")


def push_output(output_dir: str | Path, hub: HubConfig, stage: str) -> str:
    """Upload the finished stage output to `hub.model_id` (created if missing); returns its URL."""
    api = HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(hub.model_id, private=hub.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=hub.model_id,
            folder_path=str(output_dir),
            ignore_patterns=NOT_PUSHED,
            commit_message=f"rlhf-pipeline: {stage} output",
        )
    except Exception as e:  # the hub's HTTP errors, a network gone since the start
        raise HubError(
            f"hub.push_to_hub: the push to {hub.model_id} failed ({' '.join(str(e).split())}); the output is "
            f"complete in {output_dir}: push it later with `hf upload {hub.model_id} {output_dir} --exclude "
            "'checkpoints/*'`"
        ) from None
    return str(getattr(commit, "commit_url", f"{hub_endpoint()}/{hub.model_id}"))
