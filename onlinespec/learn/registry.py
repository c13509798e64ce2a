"""Versioned drafter checkpoints: files on a shared volume, the latest pointer in Redis.

``{root}/{drafter}/v{N}/`` holds ``model.safetensors`` (weights), ``config.json`` (the Hugging
Face config to rebuild the model), ``learner.safetensors`` + ``learner.json`` (learner state)
and ``manifest.json`` (version, parent, sha256 of every file, stream watermark, round metrics).

- A version is written under a temporary name, every file fsynced, then renamed: a reader never
  sees half a version, and two writers can never both create ``v{N}``.
- Version numbers come from a Redis counter; publishing moves the drafter's latest pointer with
  compare-and-set from the parent, so two workers never both advance a drafter from one parent.
- Loading verifies checksums, exact parameter names and shapes, and finite values; a version
  that fails is refused with :class:`CheckpointError` and the caller keeps what it had.
- Every version must fit the drafter's spec (architecture and parameter shapes, recorded when
  the server registers the drafter): loading and publishing check it, so a wrong-shape version is
  neither served nor learned from nor written.
- Old versions are removed past ``keep``: the latest and its ancestors are kept first; the
  latest, a pinned version and every version a live replica serves are never removed.
- The stream entries a version learned are recorded with the pointer move, in one script, so a
  round redelivered after a crash between publish and acknowledge is not learned twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from onlinespec.errors import CheckpointError, OnlineSpecError
from onlinespec.feedback import keys
from onlinespec.weights import check_fit as _check_fit
from onlinespec.weights import build_model, expected_shapes
from onlinespec.weights import read_weights

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "PublishConflict", "Manifest", "Registry", "expected_shapes", "model_spec", "read_weights",
           "ARCH_KEYS"]

# Compare-and-set of the latest pointer: ARGV[1] the expected parent ("" for none), ARGV[2] the new,
# ARGV[3] how many learned ids to keep, ARGV[4..] the stream ids this version learned (KEYS[2]);
# ids some version had learned already are counted in KEYS[3] (a detector: it should stay 0).
_CAS = """
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  local new = 0
  for i = 4, #ARGV do new = new + redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[i]) end
  if #ARGV - 3 > new then redis.call('INCRBY', KEYS[3], #ARGV - 3 - new) end
  if #ARGV >= 4 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[3]) - 1) end
  return 1
end
return 0
"""
LEARNED_KEPT = 200_000  # learned ids remembered per drafter: far more than any redelivery window

# Config keys that decide what a checkpoint's tensors mean: a version must agree on all of them.
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "hidden_act",
             "max_position_embeddings", "rms_norm_eps")


class PublishConflict(OnlineSpecError):
    """Another worker advanced the drafter from the same parent first."""


@dataclass(frozen=True)
class Manifest:
    drafter: str
    version: int
    parent: int | None
    created: float
    files: dict[str, str]  # name -> sha256
    watermark: str | None  # the last feedback stream id this version learned from
    metrics: dict
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(**json.loads(text))


def model_spec(model) -> dict:
    """What every version of a drafter must keep: its architecture keys and parameter shapes."""
    config = model.config.to_dict()
    return {"arch": {k: config.get(k) for k in ARCH_KEYS},
            "shapes": {k: list(v) for k, v in expected_shapes(model).items()}}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, root: str | Path, redis_client, keep: int = 10):
        self.root = Path(root)
        self.redis = redis_client
        self.keep = keep
        self._cas = redis_client.register_script(_CAS)

    # ------------------------------------------------------------------ reading

    def path(self, drafter: str, version: int) -> Path:
        return self.root / drafter / f"v{version}"

    def latest(self, drafter: str) -> int | None:
        value = self.redis.get(keys.latest_key(drafter))
        return int(value) if value is not None else None

    def spec(self, drafter: str) -> dict | None:
        raw = self.redis.get(keys.spec_key(drafter))
        return json.loads(raw) if raw else None

    def set_spec(self, drafter: str, model, base: str | None = None) -> bool:
        """Record the architecture the drafter's versions must have (the server does this when it
        registers its configured drafter) and, as ``base``, the model name it was loaded from (what
        a worker reloads when no version of the drafter loads any more); True when it changed."""
        spec = json.dumps({**model_spec(model), "base": base}, sort_keys=True)
        old = self.redis.get(keys.spec_key(drafter))
        self.redis.set(keys.spec_key(drafter), spec)
        return old is not None and old.decode() != spec

    def _expected(self, drafter: str, expected) -> dict | None:
        if expected is not None:
            return expected
        spec = self.spec(drafter)
        return {k: torch.Size(v) for k, v in spec["shapes"].items()} if spec else None

    def check_arch(self, drafter: str, version: int | str, config: dict) -> None:
        """A config that disagrees with the drafter's spec on what its tensors mean is refused."""
        spec = self.spec(drafter)
        if spec is None:
            return
        bad = {k: (config.get(k), v) for k, v in spec["arch"].items() if config.get(k) != v}
        if bad:
            name = next(iter(bad))
            raise CheckpointError(f"{drafter} v{version}: architecture differs from the drafter's "
                                  f"({name}: {bad[name][0]!r}, expected {bad[name][1]!r})")

    def versions(self, drafter: str) -> list[int]:
        base = self.root / drafter
        if not base.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in base.iterdir() if p.name.startswith("v") and p.name[1:].isdigit())

    def manifest(self, drafter: str, version: int) -> Manifest:
        path = self.path(drafter, version) / "manifest.json"
        try:
            return Manifest.from_json(path.read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{drafter} v{version}: unreadable manifest: {exc}") from None

    def verify(self, drafter: str, version: int) -> Manifest:
        """Checksums of every file against the manifest."""
        manifest = self.manifest(drafter, version)
        for name, digest in manifest.files.items():
            path = self.path(drafter, version) / name
            if not path.is_file():
                raise CheckpointError(f"{drafter} v{version}: missing {name}")
            if _sha256(path) != digest:
                raise CheckpointError(f"{drafter} v{version}: checksum mismatch in {name}")
        return manifest

    def load_weights(self, drafter: str, version: int, expected: dict[str, torch.Size] | None = None):
        """Verified weights of a version: (state dict, manifest). ``expected`` (name -> shape)
        must match exactly (default: the drafter's spec), and every value must be finite."""
        expected = self._expected(drafter, expected)
        manifest = self.verify(drafter, version)
        weights = read_weights(self.path(drafter, version) / "model.safetensors",
                               manifest.files.get("model.safetensors"), f"{drafter} v{version}", expected)
        return weights, manifest

    def load_model(self, drafter: str, version: int, expected: dict[str, torch.Size] | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32):
        """(model, manifest): a verified version as a Hugging Face causal LM in eval mode, on
        ``device`` in ``dtype``."""
        from transformers import AutoConfig

        import onlinespec.drafters.cut  # noqa: F401 - registers the cut drafter's model type with the Auto classes

        weights, manifest = self.load_weights(drafter, version, expected)
        try:
            config = AutoConfig.from_pretrained(self.path(drafter, version))
        except Exception as exc:
            raise CheckpointError(f"{drafter} v{version}: unreadable config: {exc}") from None
        self.check_arch(drafter, version, config.to_dict())
        model = build_model(self.path(drafter, version), weights, f"{drafter} v{version}")
        return model.to(device=device, dtype=dtype).eval(), manifest

    def load_learner_state(self, drafter: str, version: int) -> tuple[dict, dict] | None:
        base = self.path(drafter, version)
        if not (base / "learner.json").is_file():
            return None
        # read into memory, not mapped: see load_weights
        return load_safetensors((base / "learner.safetensors").read_bytes()), json.loads((base / "learner.json").read_text())

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        drafter: str,
        model,
        parent: int | None,
        learner_state: tuple[dict, dict] | None = None,
        watermark: str | None = None,
        metrics: dict | None = None,
        note: str = "",
        learned: list | None = None,
    ) -> Manifest:
        """Write a new version and move the latest pointer from ``parent`` to it (or raise
        :class:`PublishConflict` and leave the pointer alone). ``learned``: the stream ids this
        version learned, recorded with the pointer move. A model that does not fit the drafter's
        spec is refused with :class:`CheckpointError` before anything is written."""
        expected = self._expected(drafter, None)
        if expected is not None:  # refused before anything is written
            _check_fit(f"{drafter} (new version)", expected_shapes(model), expected)
            self.check_arch(drafter, "(new)", model.config.to_dict())
        current = self.latest(drafter)
        if current != parent:
            raise PublishConflict(f"{drafter}: latest is v{current}, not the parent v{parent}")
        base = self.root / drafter
        base.mkdir(parents=True, exist_ok=True)
        version = int(self.redis.incr(keys.version_counter(drafter)))
        while self.path(drafter, version).exists():  # files kept from a Redis that was reset
            version = int(self.redis.incr(keys.version_counter(drafter)))
        tmp = base / f".v{version}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)  # tied: saved once, as the embedding
            save_file(state, str(tmp / "model.safetensors"))
            model.config.to_json_file(str(tmp / "config.json"))
            if learner_state is not None:
                tensors, meta = learner_state
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "learner.safetensors"))
                (tmp / "learner.json").write_text(json.dumps(meta))
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            manifest = Manifest(drafter, version, parent, time.time(), files, watermark, metrics or {}, note)
            (tmp / "manifest.json").write_text(manifest.to_json())
            for p in tmp.iterdir():
                _fsync(p)
            _fsync(tmp)
            os.rename(tmp, self.path(drafter, version))
            _fsync(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in (learned or [])]
        if not self._cas(keys=[keys.latest_key(drafter), keys.learned_key(drafter), keys.relearned_key(drafter)],
                         args=["" if parent is None else str(parent), str(version), LEARNED_KEPT, *ids]):
            shutil.rmtree(self.path(drafter, version), ignore_errors=True)
            raise PublishConflict(f"{drafter}: another worker advanced from v{parent} first")
        self.redis.xadd(
            keys.events_stream,
            {"type": "published", "drafter": drafter, "version": version, "parent": "" if parent is None else parent},
            maxlen=10_000, approximate=True,
        )
        self.gc(drafter)
        return manifest

    # ------------------------------------------------------------------ bootstrap and repair (idempotent; safe
    # with several replicas and workers: every pointer move is a compare-and-set)

    def repair(self, drafter: str, expected=None) -> int | None:
        """Point the drafter back at its newest version older than the latest that loads (checksums,
        names and shapes in ``expected``, finite values), when the latest itself does not: its files
        were lost or damaged (a registry volume reset beside a Redis that kept its pointer, a disk
        fault). Returns the version now latest, or None when no older version loads either. The
        move is a compare-and-set rollback with its reason in the events stream."""
        latest = self.latest(drafter)
        if latest is None:
            return None
        try:
            self.load_weights(drafter, latest, expected)
            return latest
        except CheckpointError as exc:
            problem = str(exc)
        log.error("%s: the latest version cannot be loaded (%s); looking for an older one", drafter, problem)
        for v in sorted((v for v in self.versions(drafter) if v < latest), reverse=True):
            try:
                self.load_weights(drafter, v, expected)
            except CheckpointError:
                continue
            try:
                self.rollback(drafter, v, reason=f"latest unloadable: {problem}"[:500])
            except (CheckpointError, PublishConflict):  # another process moved it first: theirs stands
                return self.latest(drafter)
            log.warning("%s: rolled back from unloadable v%s to v%s", drafter, latest, v)
            return v
        return None


    def bootstrap(self, drafter: str, model, base: str | None = None) -> int:
        """Make sure the drafter has a latest version that loads: record its spec (architecture and
        shapes: every later version must fit it), register the base model as its first version when
        it has none; when the latest cannot be loaded, go back to the newest version that can
        (:meth:`repair`) or, when none can, publish the base model on top of it."""
        if self.set_spec(drafter, model, base):
            log.warning("%s: the configured model's architecture differs from the registry's versions; "
                        "versions that do not fit it will be refused", drafter)
        latest = self.latest(drafter)
        if latest is not None:
            repaired = self.repair(drafter, expected_shapes(model))
            if repaired is not None:
                return repaired
            log.error("%s: no kept version loads; serving and learning restart from the base model", drafter)
        try:
            return self.publish(drafter, model, parent=latest, note="base model" if latest is None else
                                f"base model (no kept version of v{latest}'s line could be loaded)").version
        except PublishConflict:
            return self.latest(drafter)

    def recover(self, drafter: str) -> int:
        """The version to continue from after the latest failed to load: the newest version that
        loads (:meth:`repair`) or, when none does, the base model the server registered,
        reloaded from the spec's ``base`` and published again (:meth:`bootstrap`). Raises
        :class:`CheckpointError` when neither is possible (a spec without a base)."""
        repaired = self.repair(drafter)
        if repaired is not None:
            return repaired
        base = (self.spec(drafter) or {}).get("base")
        if not base:
            raise CheckpointError(f"{drafter}: no version loads and its spec names no base model to start again from")
        from onlinespec.models import load_model

        log.error("%s: no kept version loads; learning restarts from the base model %s", drafter, base)
        return self.bootstrap(drafter, load_model(base), base)

    def rollback(self, drafter: str, to_version: int, reason: str = "", expect: int | None = None) -> None:
        """Point the drafter back at a kept version (learners continue from it). ``expect``: the
        version judged bad; the move happens only while it is still the latest (a version
        published meanwhile is not overwritten by a verdict on its predecessor)."""
        self.load_weights(drafter, to_version)
        current = self.latest(drafter) if expect is None else expect
        if not self._cas(keys=[keys.latest_key(drafter), keys.learned_key(drafter), keys.relearned_key(drafter)],
                         args=["" if current is None else str(current), str(to_version), LEARNED_KEPT]):
            raise PublishConflict(f"{drafter}: latest is no longer v{current}; rollback to v{to_version} not done")
        self.redis.xadd(
            keys.events_stream,
            {"type": "rollback", "drafter": drafter, "version": to_version, "from": current or "", "reason": reason},
            maxlen=10_000, approximate=True,
        )

    def mark_serving(self, drafter: str, replica: str, version: int, ttl: float = 60.0) -> None:
        """A serving replica says which version it serves (refreshed by its watcher); kept from gc."""
        self.redis.hset(keys.serving_key(drafter), replica, json.dumps({"version": version, "until": time.time() + ttl}))

    def protected(self, drafter: str) -> set[int]:
        """Versions gc never removes: pinned, and served by a replica that reported in time."""
        out, now, stale = set(), time.time(), []
        pinned = self.redis.get(keys.pinned_key(drafter))
        if pinned is not None:
            out.add(int(pinned))
        for replica, raw in self.redis.hgetall(keys.serving_key(drafter)).items():
            try:
                entry = json.loads(raw)
                if entry["until"] >= now:
                    out.add(int(entry["version"]))
                    continue
            except (ValueError, KeyError, TypeError):
                pass
            stale.append(replica)
        if stale:
            self.redis.hdel(keys.serving_key(drafter), *stale)
        return out

    def lineage(self, drafter: str, version: int) -> list[int]:
        """``version`` and its ancestors that are still on disk, newest first, by the manifests'
        parent links (a missing or unreadable manifest ends the chain)."""
        chain: list[int] = []
        current: int | None = version
        while current is not None and current not in chain and self.path(drafter, current).is_dir():
            chain.append(current)
            try:
                current = self.manifest(drafter, current).parent
            except CheckpointError:
                break
        return chain

    def gc(self, drafter: str) -> list[int]:
        """Keep ``keep`` versions: the latest and its ancestors first (the versions a rollback
        goes back to), then the newest others. Versions numbered after the latest are left alone:
        another worker may be writing one right now.

        Counting ancestry first matters: a worker that lost the compare-and-set removes its
        directory only after the winner's collection may have run, and a version published
        after a rollback has an old parent; counting by number alone removed real history
        (the parent, or the first version) in favour of those."""
        latest = self.latest(drafter)
        if latest is None:
            return []
        older = [v for v in self.versions(drafter) if v < latest]
        keep = self.lineage(drafter, latest)[: max(1, self.keep)]
        others = sorted((v for v in older if v not in keep), reverse=True)
        kept = set(keep) | set(others[: max(0, self.keep - len(keep))]) | self.protected(drafter)
        doomed = [v for v in older if v not in kept]
        for v in doomed:
            shutil.rmtree(self.path(drafter, v), ignore_errors=True)
        return doomed
