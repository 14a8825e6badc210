"""Client tokens: standard HS256 JWTs that a business server mints with any JWT library.

Claims: `sub` (the uid), `aud` (the product) and `exp`. Only HS256 is accepted, so a
token signed with another algorithm, or with `none`, is refused whatever it claims.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from im.config import Product

ALGORITHM = "HS256"
LEEWAY_S = 5

# Configured secrets are checked for length when loaded (im.config); the one short key is
# the development product's, which already logs a loud warning of its own.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


class AuthFailure(Exception):
    """Why a token was refused; the text is safe to send to the client."""


def issue_token(product: Product, uid: str, ttl: float = 3600) -> str:
    now = int(time.time())
    claims = {"sub": uid, "aud": product.name, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, product.secret, algorithm=ALGORITHM)


def verify_token(products: Mapping[str, Product], product: str, uid: str, token: str) -> None:
    """Raise AuthFailure unless `token` was signed for this product and uid and is current."""
    entry = products.get(product)
    if entry is None:
        raise AuthFailure(f"unknown product {product[:64]!r}")
    try:
        claims = jwt.decode(
            token,
            entry.secret,
            algorithms=[ALGORITHM],
            audience=product,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthFailure("token expired") from None
    except jwt.InvalidAudienceError:
        raise AuthFailure("token was issued for another product") from None
    except jwt.InvalidAlgorithmError:
        raise AuthFailure("token algorithm not allowed (HS256 only)") from None
    except jwt.InvalidSignatureError:
        raise AuthFailure("token signature is invalid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthFailure(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise AuthFailure(f"token is invalid: {exc}") from None
    if claims["sub"] != uid:
        raise AuthFailure("token was issued for another uid")
