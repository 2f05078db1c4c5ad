"""SecAgg+ (Bell et al., CCS 2020) as pure functions: key agreement, secret sharing, masks.

The server learns the sum of the devices' integer vectors modulo 2^64 and nothing else about
any one vector, even when devices drop out after masking, as long as `threshold` devices of
each device's neighbourhood answer the last stage. Four stages per round, each one message
each way (`strategies.secure.device` / `strategies.secure.server` carry them):

1. setup: the server names the round's devices U0, the neighbour count k and the threshold
   t; each device checks them (`check_setup`), makes two X25519 key pairs (c: to encrypt
   shares; s: to agree masks) and sends the public keys.
2. share keys: the server relays the public keys of the devices that answered (U1); each
   device draws a self-mask seed b, splits b and its secret s-key into t-of-n Shamir shares
   over its neighbourhood and sends each neighbour its two shares, encrypted with their
   c-agreed key (the server routes ciphertexts it cannot read).
3. masked input (with the TRAIN message): each device decrypts its shares and uploads
       y_u = x_u + PRG(b_u) + sum_{v in N(u) cap U1, v > u} PRG(s_uv)
                             - sum_{v in N(u) cap U1, v < u} PRG(s_uv)   (mod 2^64)
   where s_uv is the X25519 agreement of u's and v's s-keys (HKDF to 32 bytes).
4. unmask: the server names the devices whose inputs arrived (U2) and those that dropped
   after sharing (U1 minus U2); each device of U2 that is still there sends its share of b_v
   for every neighbour v in U2 and of the s-key for every dropped neighbour, never both for
   one device (`check_unmask`). The server rebuilds b_v (v in U2) and the s-keys of the
   dropped, removes PRG(b_v) and the dropped devices' pairwise masks, and has
   sum_{u in U2} x_u.

Built on Flower's pieces (`flwr.common.secure_aggregation`): Shamir shares (`crypto.shamir`:
`create_shares`, `combine_shares`), authenticated encryption of the shares
(`crypto.symmetric_encryption`: `encrypt`, `decrypt`, Fernet) and the share framing
(`secaggplus_utils.share_keys_plaintext_concat` / `_separate`). Two changes from Flower's
`secaggplus_mod`: the keys are X25519 (Flower's are NIST-curve keys), and the masks are a
ChaCha20 key stream keyed by the full 256-bit secret, where Flower's `pseudo_rand_gen`
folds its seed to 32 bits (a server could try all 2^32 seeds of a self-mask).

A neighbourhood N(u) is u and the k devices nearest it on the ring of U0 in node-id order
(k = 0: everyone; SecAgg+ takes k ~ log n). Both ends compute it from U0 and k, so the
server cannot hand a device a neighbourhood of its own choosing.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                          PrivateFormat, PublicFormat)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)

MIN_DEVICES = 3  # a sum over two devices is the other device's input to either of them
MIN_OTHERS = 2


class Refused(ValueError):
    """A device refuses a stage: the server's message would weaken the masking."""


# ------------------------------------------------------------------------------ who shares
def neighbours(devices: Sequence[int], me: int, k: int) -> list[int]:
    """The k devices nearest `me` on the ring of `devices` sorted by id (k/2 each side;
    k = 0 or k >= n - 1: all others). Symmetric: v in N(u) iff u in N(v)."""
    ring = sorted(int(d) for d in devices)
    n = len(ring)
    if k <= 0 or k >= n - 1:
        return [d for d in ring if d != me]
    i = ring.index(me)
    half = k // 2
    near = {ring[(i + j) % n] for j in range(-half, half + 1) if j}
    return sorted(near)


def threshold_for(t: float, size: int) -> int:
    """`secure.threshold` as a count for a neighbourhood of `size` devices (itself
    included): t >= 1 is a count, 0 < t < 1 a fraction (rounded up)."""
    return int(t) if t >= 1 else int(np.ceil(t * size))


def check_setup(devices: Sequence[int], me: int, k: int, threshold: int) -> list[int]:
    """This device's neighbourhood for a round the server set up with `devices`, `k` and
    `threshold`, or Refused: duplicates (masks against a repeated peer cancel), without this
    device, fewer than MIN_DEVICES devices or MIN_OTHERS neighbours (a sum over two devices
    is the other device's input), or a threshold the server could meet twice with disjoint
    halves of a neighbourhood (t <= |N|/2: asked for a device's self-mask share by one half
    and its key share by the other, it would learn that device's input)."""
    ids = [int(d) for d in devices]
    if len(set(ids)) != len(ids):
        raise Refused(f"the server's device list {ids} names a device twice: refused (masks "
                      "against a repeated device cancel out)")
    if me not in ids:
        raise Refused(f"the server's device list does not include this device ({me}): "
                      "refused")
    if len(ids) < MIN_DEVICES:
        raise Refused(f"secure aggregation over {len(ids)} device(s): at least "
                      f"{MIN_DEVICES} are needed (a sum of two is the other one's input)")
    near = neighbours(ids, me, k)
    if len(near) < MIN_OTHERS:
        raise Refused(f"{len(near)} neighbour(s): at least {MIN_OTHERS} are needed")
    size = len(near) + 1
    if not size // 2 < threshold <= size:
        raise Refused(f"threshold {threshold} for a neighbourhood of {size}: it must be more "
                      f"than half ({size // 2 + 1}..{size}), or the server could rebuild "
                      "both secrets of one device from two disjoint groups")
    return near


def check_unmask(held: Iterable[int], survived: Sequence[int], dropped: Sequence[int],
                 threshold: int) -> None:
    """Refused unless U2 (`survived`) and the dropped are disjoint and at least `threshold`
    of this device's neighbourhood (`held`: the devices whose shares it holds) survived.
    A device named in both would give the server its self-mask seed and its key, hence its
    input in the clear."""
    both = sorted(set(survived) & set(dropped))
    if both:
        raise Refused(f"devices {both} are named as both surviving and dropped: refused (the "
                      "server would get both secrets of each)")
    alive = set(held) & set(survived)
    if len(alive) < threshold:
        raise Refused(f"{len(alive)} of this device's neighbourhood survived, under the "
                      f"threshold {threshold}: refused")


# ------------------------------------------------------------------------------ keys
def new_key_pair() -> tuple[bytes, bytes]:
    """(private, public) X25519 keys as 32 raw bytes each."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """32 bytes both ends derive: HKDF-SHA256 of the X25519 agreement, bound to `purpose`
    (the stage, run and round: a key is never reused across rounds)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(shared)


def purpose(what: str, run_id: int, server_round: int) -> bytes:
    return f"edge-lam/secagg+/{what}/{int(run_id)}/{int(server_round)}".encode()


def fernet_key(private: bytes, public: bytes, info: bytes) -> bytes:
    """The key Flower's `encrypt` / `decrypt` take (url-safe base64 of 32 bytes)."""
    return base64.urlsafe_b64encode(agree(private, public, info))


# ------------------------------------------------------------------------------ masks
def prg(key: bytes, n: int, label: bytes = b"mask") -> np.ndarray:
    """n uniform uint64 from the ChaCha20 key stream of a 32-byte key (nonce: a hash of
    `label`)."""
    nonce = hashlib.sha256(label).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * n)), dtype="<u8").astype(np.uint64,
                                                                           copy=False)


def pair_sign(me: int, other: int) -> int:
    """+1 when `me` adds the pair's mask, -1 when it subtracts it (the larger id adds)."""
    return 1 if me > other else -1


def masked(plain: np.ndarray, self_seed: bytes, pair_keys: Mapping[int, bytes],
           me: int) -> np.ndarray:
    """plain + PRG(b) + sum_v sign(me, v) PRG(s_me,v)  (mod 2^64); plain: uint64."""
    out = np.array(plain, dtype=np.uint64, copy=True).ravel()
    with np.errstate(over="ignore"):
        out += prg(self_seed, out.size, b"self")
        for other, key in sorted(pair_keys.items()):
            mask = prg(key, out.size, b"pair")
            if pair_sign(me, other) > 0:
                out += mask
            else:
                out -= mask
    return out.reshape(np.shape(plain))


# ------------------------------------------------------------------------------ shares
def split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """t-of-n Shamir shares of `secret`, one per holder (Flower's `create_shares`)."""
    shares = create_shares(secret, threshold, len(holders))
    return dict(zip(holders, shares))


def seal(me: int, to: int, b_share: bytes, sk_share: bytes, key: bytes) -> bytes:
    """The two shares `me` sends `to`, framed with both ids and encrypted (Fernet)."""
    return encrypt(key, share_keys_plaintext_concat(me, to, b_share, sk_share))


def unseal(ciphertext: bytes, key: bytes, src: int, me: int) -> tuple[bytes, bytes]:
    """(b share, s-key share) from `src`; Refused when the frame names other devices (a
    server replaying another pair's ciphertext) or the key does not open it."""
    try:
        plaintext = decrypt(key, ciphertext)
    except Exception as err:  # cryptography.fernet.InvalidToken
        raise Refused(f"a share said to come from device {src} does not decrypt with its "
                      f"key ({err.__class__.__name__}): refused") from None
    actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(plaintext)
    if actual_src != src or dst != me:
        raise Refused(f"a share from device {actual_src} to {dst} was delivered as from "
                      f"{src} to {me}: refused")
    return b_share, sk_share


def rebuild(shares: Sequence[bytes], threshold: int, what: str,
            basis: dict | None = None) -> bytes:
    """A secret from at least `threshold` shares of Flower's format (4-byte index, then 16
    bytes per chunk). Equal to Flower's `combine_shares` (tested), but the Lagrange
    coefficients at 0 of a set of share indices are computed once and kept in `basis`:
    the server rebuilds many secrets from the same devices' shares, and computing them per
    secret (t inversions in GF(2^128) per chunk, in Python) made unmasking 100 devices
    take a minute."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares of {what}, under the threshold {threshold}: "
                         "the round cannot be unmasked")
    if basis is None:
        return combine_shares(list(shares[:threshold]))
    from Crypto.Protocol.SecretSharing import _Element
    from Crypto.Util.Padding import unpad

    chosen = list(shares[:threshold])
    xs = tuple(int.from_bytes(sh[:4], "little") for sh in chosen)
    if xs not in basis:
        coeffs = []
        for j, xj in enumerate(xs):
            num, den = _Element(1), _Element(1)
            for m, xm in enumerate(xs):
                if m != j:
                    num *= _Element(xm)
                    den *= _Element(xj) + _Element(xm)
            coeffs.append(num * den.inverse())
        basis[xs] = coeffs
    coeffs = basis[xs]
    chunks = (len(chosen[0]) - 4) // 16
    out = bytearray()
    for c in range(chunks):
        acc = _Element(0)
        for lam, sh in zip(coeffs, chosen):
            acc += lam * _Element(sh[4 + 16 * c:20 + 16 * c])
        out += acc.encode()
    try:
        return unpad(bytes(out), 16)
    except ValueError:
        raise ValueError(f"the shares of {what} do not rebuild a secret") from None


# ------------------------------------------------------------------------------ the sum
@dataclass
class Unmasking:
    """What the server needs to remove the masks of a round: the devices and their public
    s-keys, who survived (U2) and who dropped after sharing, and the shares it got back."""

    run_id: int
    server_round: int
    devices: Sequence[int]  # U0 (neighbourhoods are computed over it)
    k: int
    threshold: int
    s_keys: Mapping[int, bytes]  # public s-keys of U1
    survived: Sequence[int]  # U2: their masked inputs arrived
    dropped: Sequence[int]  # U1 minus U2
    b_shares: Mapping[int, list[bytes]]  # v in U2 -> shares of b_v
    sk_shares: Mapping[int, list[bytes]]  # d dropped -> shares of its s-key

    def remove_masks(self, total: np.ndarray) -> np.ndarray:
        """sum_{u in U2} x_u from sum_{u in U2} y_u (uint64, mod 2^64)."""
        out = np.array(total, dtype=np.uint64, copy=True).ravel()
        u1 = set(self.s_keys)
        survived = set(self.survived)
        basis: dict = {}  # Lagrange coefficients per set of share indices
        with np.errstate(over="ignore"):
            for v in self.survived:
                seed = rebuild(self.b_shares.get(v, []), self.threshold,
                               f"device {v}'s self-mask seed", basis)
                out -= prg(seed, out.size, b"self")
            info = purpose("mask", self.run_id, self.server_round)
            for d in self.dropped:
                sk = rebuild(self.sk_shares.get(d, []), self.threshold,
                             f"dropped device {d}'s key", basis)
                if public_of(sk) != self.s_keys[d]:
                    raise ValueError(f"the shares of device {d}'s key rebuild another key: "
                                     "a device sent bad shares")
                for v in neighbours(self.devices, d, self.k):
                    if v in survived and v in u1:  # v masked with d: take v's mask out
                        mask = prg(agree(sk, self.s_keys[v], info), out.size, b"pair")
                        if pair_sign(v, d) > 0:
                            out -= mask
                        else:
                            out += mask
        return out.reshape(np.shape(total))


def sum_uint64(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """sum of uint64 vectors modulo 2^64."""
    total = None
    with np.errstate(over="ignore"):
        for v in vectors:
            v = np.asarray(v, dtype=np.uint64)
            total = v.copy() if total is None else total + v
    if total is None:
        raise ValueError("no masked input to sum")
    return total


# ------------------------------------------------------------------------------ fixed point
FRACTION_BITS = 39  # x in [-clip, clip] -> round(x / clip * 2^39): |q| <= 2^39
MAX_WEIGHT_SUM = 1 << 23  # sum_k n_k |q| < 2^62: the signed sum cannot wrap


def quantize(x: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """(int64 fixed point of x clipped to [-clip, clip], how many entries were clipped)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("a value to aggregate is not finite")
    clipped = int(np.count_nonzero(np.abs(x) > clip))
    q = np.rint(np.clip(x, -clip, clip) * (2.0 ** FRACTION_BITS / clip)).astype(np.int64)
    return q, clipped


def dequantize(q: np.ndarray, clip: float) -> np.ndarray:
    return np.asarray(q, dtype=np.int64).astype(np.float64) * (clip / 2.0 ** FRACTION_BITS)


def as_uint64(q: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(q, dtype=np.int64).view(np.uint64)


def as_int64(u: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(u, dtype=np.uint64).view(np.int64)
