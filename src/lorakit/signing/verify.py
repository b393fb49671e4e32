"""`verify_adapter`: check model.sig with the given public keys, then say in one line what, if anything, changed.

model-signing verifies the bundle's signature first, then re-hashes the folder and compares manifests,
raising `ValueError("Signature mismatch: [...]")` with its diff (extra files, missing files, hash
mismatches). That diff is read back here and put in an adapter's terms:

    X was modified after signing            a file's bytes changed
    lorakit_card.json was edited            the card alone changed
    X was added / X was removed             a file that is not / no longer in the signed manifest
    X was renamed to Y                      an added file holds exactly a removed file's signed bytes
    model.sig belongs to another adapter    the weights and the card both differ: a signature copied over
    signed by another key                   none of the given public keys made it
    signed for base X, not Y                the card's base is not the model given with base_model
"""

from __future__ import annotations

import ast
import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from lorakit.errors import LorakitError, SignatureError
from lorakit.io.adapter import WEIGHTS_NAME, Adapter
from lorakit.io.adapter_config import CONFIG_NAME
from lorakit.signing.card import CARD_NAME, describe_base, file_sha256
from lorakit.signing.keys import check_public_key
from lorakit.signing.sign import SIGNATURE_NAME

MISMATCH = "Signature mismatch: "
EXTRA = re.compile(r"Extra files found in model '.*?': (.*)", re.S)
MISSING = re.compile(r"Missing files in model '.*?': (.*)", re.S)
CHANGED = re.compile(r"Hash mismatch for '(.*)': Expected ", re.S)


@dataclass(frozen=True)
class Verification:
    """A verified adapter folder: the public key that verified model.sig, and the signed card.

    card: the signed lorakit_card.json as a dict; None for a folder signed without one (by model-signing's
    own CLI, say), which vouches for the files but records no base, data or creator.
    adapter: the adapter, read and checked after the signature; with a card, its digest is the card's, so
    these are the very bytes the signer named (use it rather than reading the folder again).
    """

    folder: Path
    key: Path
    adapter_digest: str
    card: Optional[dict]
    adapter: Adapter = field(repr=False)

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "verified": True, "key": str(self.key),
                "adapter_digest": self.adapter_digest, "card": self.card}


def verify_adapter(folder: Union[str, Path], public_keys: Sequence[Union[str, Path]], *,
                   base_model: Optional[Union[str, Path]] = None) -> Verification:
    """Verify folder/model.sig with any of `public_keys` (EC PEM files); with `base_model` (a local model
    folder, or "embedded"), also that the adapter was signed for that base. SignatureError names what is wrong."""
    folder = Path(folder)
    signature = folder / SIGNATURE_NAME
    if not signature.is_file():
        raise SignatureError(f"{folder} has no {SIGNATURE_NAME}: the adapter is not signed "
                             f"(lorakit sign {folder} --key PRIVATE.pem signs it)")
    if not public_keys:
        raise SignatureError("no public key given to verify with (--key PUBLIC.pem)")
    key = _verifying_key(folder, signature, [check_public_key(k) for k in public_keys])
    card = _read_card(folder)
    _check_coverage(folder, signature, card is not None)
    adapter = Adapter.read(folder, allow_hub=False)
    carded = (card.get("adapter") or {}).get("digest") if card is not None else adapter.digest
    if carded != adapter.digest:
        raise SignatureError(f"{folder}: the signed {CARD_NAME} is of another adapter ({str(carded)[:19]}), not "
                             f"of this one ({adapter.digest[:19]}); it was signed with a stale card")
    if base_model is not None:
        _check_base(folder, adapter, card, base_model)
    return Verification(folder, key, adapter.digest, card, adapter)


def _check_coverage(folder: Path, signature: Path, has_card: bool) -> None:
    """A signature made with the adapter's files ignored (model_signing sign --ignore-paths ...) verifies
    without vouching for them: refuse it, naming the files it leaves out."""
    signed = _signed_digests(signature)
    needed = (CONFIG_NAME, WEIGHTS_NAME) + ((CARD_NAME,) if has_card else ())
    left_out = [name for name in needed if name not in signed]
    if left_out:
        raise SignatureError(f"{folder}: {SIGNATURE_NAME} does not cover {', '.join(left_out)} (it was signed with "
                             "them ignored), so it vouches for none of the adapter; sign the folder again")


def _verifying_key(folder: Path, signature: Path, keys: list[Path]) -> Path:
    """The first key whose signature check passes; a manifest mismatch is explained, not retried."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    for key in keys:
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key).verify(folder, signature)
            return key
        except InvalidSignature:
            continue
        except ValueError as exc:
            text = str(exc)
            if text.startswith(MISMATCH):
                raise SignatureError(f"{folder}: {explain_mismatch(folder, signature, text)}") from None
            if text.startswith("Key mismatch"):
                continue
            raise SignatureError(f"{signature}: not a signature model-signing can read ({_first_line(exc)})") \
                from None
        except Exception as exc:  # a truncated or hand-edited bundle fails inside its parsers
            raise SignatureError(f"{signature}: not a signature model-signing can read ({_first_line(exc)})") \
                from None
    names = ", ".join(str(k) for k in keys)
    raise SignatureError(f"{folder}: {SIGNATURE_NAME} was signed by another key: none of the given keys ({names}) "
                         "verified it")


def explain_mismatch(folder: Path, signature: Path, text: str) -> str:
    """model-signing's manifest diff ("Signature mismatch: [...]") as one line in an adapter's terms."""
    try:
        lines = ast.literal_eval(text[len(MISMATCH):])
    except (ValueError, SyntaxError):
        return text
    extra, missing, changed = [], [], []
    for line in lines:
        for pattern, found in ((EXTRA, extra), (MISSING, missing)):
            match = pattern.match(line)
            if match:
                found += match.group(1).split(", ")
        match = CHANGED.match(line)
        if match:
            changed.append(match.group(1))
    if WEIGHTS_NAME in changed and CARD_NAME in changed and _card_is_own(folder):
        return (f"{SIGNATURE_NAME} belongs to another adapter: the {WEIGHTS_NAME} and {CARD_NAME} it signs are "
                "not this folder's (a signature copied from another adapter's folder, or this adapter replaced)")
    signed = _signed_digests(signature)
    problems = []
    for name in list(extra):
        digest = file_sha256(folder / name).removeprefix("sha256:") if (folder / name).is_file() else None
        source = next((m for m in missing if digest is not None and signed.get(m) == digest), None)
        if source is not None:
            problems.append(f"{source} was renamed to {name}")
            extra.remove(name)
            missing.remove(source)
    problems += [f"{CARD_NAME} was edited after signing" if name == CARD_NAME else
                 f"{name} was modified after signing (its sha256 is not the signed one)" for name in changed]
    problems += [f"{name} was added after signing (it is not in the signed manifest)" for name in extra]
    problems += [f"{name} was removed after signing" for name in missing]
    return "; ".join(problems) or text


def _signed_digests(signature: Path) -> dict[str, str]:
    """{file: sha256 hex} from the signed statement (read after model-signing verified its signature)."""
    try:
        envelope = json.loads(signature.read_text())["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _card_is_own(folder: Path) -> bool:
    """Whether the folder's current card names the adapter beside it (a signature copied in, not a card edited)."""
    card = _read_card(folder)
    try:
        return card is not None and (card.get("adapter") or {}).get("digest") == Adapter.read(folder).digest
    except LorakitError:
        return False


def _read_card(folder: Path) -> Optional[dict]:
    path = folder / CARD_NAME
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise SignatureError(f"{path}: the signed card is not JSON") from None
    if not isinstance(card, dict):
        raise SignatureError(f"{path}: the signed card is not a JSON object")
    return card


def _check_base(folder: Path, adapter: Adapter, card: Optional[dict], base_model: Union[str, Path]) -> None:
    """Refuse a base other than the one the card records: by weight files when the card lists them, else by
    the adapter's own record of its base (io.base_record), checked against the model loaded."""
    if card is None:
        raise SignatureError(f"{folder}: its signature covers no {CARD_NAME}, so the base it was signed for is "
                             "unknown (sign it with lorakit sign to record one)")
    base = card.get("base") or {}
    signed_for = base.get("model") or base.get("name") or "an unrecorded base"
    if base.get("weights"):
        _, weights = describe_base(base_model)
        if weights != base["weights"]:
            raise SignatureError(f"{folder}: signed for base {signed_for} ({_files(base['weights'])}), not "
                                 f"{base_model} ({_files(weights)})")
        return
    if adapter.base is None or adapter.base.digest is None:
        raise SignatureError(f"{folder}: {CARD_NAME} records no base weights (it was signed without --model, and "
                             f"the adapter file records none), so --model {base_model} cannot be checked")
    from lorakit.io.base_record import compare_base
    from lorakit.io.peft_format import load_adapter
    from lorakit.models.loading import load_model

    model = load_model(base_model)
    try:
        status = compare_base(model, load_adapter(model, adapter), adapter.base).status
    except LorakitError as exc:  # the adapter does not even fit the model given
        status, why = "different", _first_line(exc)
    else:
        why = "its weights differ"
    if status == "different":
        raise SignatureError(f"{folder}: signed for base {adapter.base.describe()}, not {base_model} ({why})")


def _files(weights: dict) -> str:
    shown = [f"{name} {digest[:19]}" for name, digest in sorted(weights.items())]
    return ", ".join(shown[:2]) + (f" and {len(shown) - 2} more" if len(shown) > 2 else "")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
