"""Key files: ECDSA keys on the curves model-signing accepts, refused in one line naming the file otherwise.

model-signing's key flow is elliptic-curve only (P-256, P-384, P-521; Ed25519 and RSA are refused), so a
key of another kind is caught here, before any hashing, with a message that names the key file.

    openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out signer.pem
    openssl ec -in signer.pem -pubout -out signer.pub.pem
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lorakit.errors import SignatureError

CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
KEY_ADVICE = "lorakit signs with ECDSA P-256, P-384 or P-521 keys (docs/signing.md shows how to make one)"


def check_private_key(path: Union[str, Path]) -> Path:
    """The path of a readable, unencrypted EC private key in PEM; SignatureError naming the file otherwise."""
    path = Path(path)
    _check_curve(path, lambda data: serialization.load_pem_private_key(data, password=None), "private")
    return path


def check_public_key(path: Union[str, Path]) -> Path:
    """The path of a readable EC public key in PEM; SignatureError naming the file otherwise."""
    path = Path(path)
    _check_curve(path, serialization.load_pem_public_key, "public")
    return path


def _check_curve(path: Path, load, kind: str) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the {kind} key ({exc.strerror or exc})") from None
    if kind == "public" and b"PRIVATE KEY-----" in data:
        raise SignatureError(f"{path}: a private key; verify with its public key "
                             f"(openssl ec -in {path.name} -pubout), which is all a verifier should hold")
    try:
        key = load(data)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise SignatureError(f"{path}: the private key is encrypted; lorakit needs it unencrypted "
                             "(openssl pkcs8 -topk8 -nocrypt)") from None
    except ValueError:
        raise SignatureError(f"{path}: not a PEM {kind} key; {KEY_ADVICE}") from None
    curve = getattr(getattr(key, "curve", None), "name", None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        kind_name = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
        raise SignatureError(f"{path}: the key is {kind_name}, not ECDSA; {KEY_ADVICE}")
    if curve not in CURVES:
        raise SignatureError(f"{path}: the key is ECDSA on curve {curve}; {KEY_ADVICE}")
