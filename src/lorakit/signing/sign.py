"""`sign_adapter`: write the card, then `model.sig` over every file of the folder (model-signing's format).

The manifest is model-signing's file serialization with sha256: one (relative path, sha256) pair per file
of the folder, model.sig itself and git's files (.git, .gitignore, .gitattributes, .github) excluded, exactly
as `model_signing sign key DIR --signature DIR/model.sig` builds it, so either tool verifies the other's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lorakit.errors import LorakitError, SignatureError
from lorakit.signing.card import write_card
from lorakit.signing.keys import check_private_key

SIGNATURE_NAME = "model.sig"


def hashing_config():
    """sha256 per file, model.sig left out: what the signature's manifest is built with."""
    from model_signing import hashing

    return hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(
        paths=[SIGNATURE_NAME], ignore_git_paths=True)


def sign_adapter(folder: Union[str, Path], private_key_path: Union[str, Path, None], *,
                 creator: Optional[str] = None, base_model: Optional[Union[str, Path]] = None,
                 sigstore: bool = False) -> Path:
    """Write folder/lorakit_card.json, then sign the folder with an EC private key (or, with `sigstore`,
    keylessly through Sigstore's OIDC login and transparency log); returns the path of model.sig."""
    from model_signing import signing

    folder = Path(folder)
    if sigstore == (private_key_path is not None):
        raise SignatureError("sign with a private key (--key PRIVATE.pem) or keylessly (--sigstore), not both "
                             "or neither")
    config = signing.Config().set_hashing_config(hashing_config())
    if not sigstore:
        config.use_elliptic_key_signer(private_key=check_private_key(private_key_path))
        write_card(folder, creator=creator, base_model=base_model)
        config.sign(folder, folder / SIGNATURE_NAME)
        return folder / SIGNATURE_NAME
    try:
        config.use_sigstore_signer()  # fetches Sigstore's trust root: the first step that needs the internet
        write_card(folder, creator=creator, base_model=base_model)
        config.sign(folder, folder / SIGNATURE_NAME)
    except LorakitError:  # the folder's own problems, not Sigstore's
        raise
    except Exception as exc:  # sigstore's own errors, and the network's beneath them
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SignatureError(f"keyless signing failed: {reason}. Sigstore needs the internet (its trust root, an "
                             "OIDC login, its transparency log); sign with --key PRIVATE.pem instead") from None
    return folder / SIGNATURE_NAME
