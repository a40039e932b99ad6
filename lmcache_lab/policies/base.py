"""The eviction-policy interface shared by live tiers and the trace replay.

A policy orders the chunks resident in one tier. Its owner calls:

    on_insert(key, nbytes, parent, position)   a chunk became resident (parent: key of the chunk
                                               before it in its prefix chain, or None)
    on_access(chain)                           a request used these resident chunks (root first)
    on_remove(key)                             a chunk left the tier (evicted or deleted)
    victim(can_evict) -> key | None            the next chunk to evict
    on_insert_chain / pop_victims              batch forms of on_insert / pop_victim + on_remove
                                               (defaults loop; a policy may fuse them)
    admit(key, nbytes, parent, position)       may a chunk be stored when that needs an eviction?
                                               (asked only when `admits_all` is False)

Offline policies (`offline = True`, e.g. `belady`) also take the future of a trace through
`prepare(chains)` and `advance(t)`; only the trace replay can give it, and a tier refuses an
offline policy that was not prepared.

Invariants every policy keeps (the tests check them):
  * tail first: `victim` never returns a chunk that has a resident child in this tier. A chunk is
    useful only if its whole prefix is present, so evicting a parent before its children would
    leave orphans that no lookup can reach (vLLM frees block chains tail first; SGLang evicts only
    radix-tree leaves).
  * `victim` never returns a key for which `can_evict(key)` is False (pinned: being loaded).
  * pure Python, no torch; every operation O(1) or O(log n) apart from skipping pinned entries.
"""
from __future__ import annotations

from typing import Callable, Container, Hashable, Iterable, Iterator, Sequence

Key = Hashable


class EvictionPolicy:
    name = "base"
    offline = False     # needs prepare()/advance(): the future of a trace (replay only)
    admits_all = True   # False: the tier asks `admit` before evicting to store a chunk
    # True: the victims do not depend on chunks stored meanwhile, so a tier may take every victim
    # a new chain needs first and then store the chain at once (`BudgetedTier.put_chain`)
    batch_evicts = False

    def __init__(self, chunk_tokens: int = 256, **params):
        if params:
            raise ValueError(f"policy {self.name!r}: unknown parameter(s) {', '.join(sorted(params))}")
        self.chunk_tokens = chunk_tokens
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, int] = {}

    # ---- prefix-chain bookkeeping (shared) ------------------------------------------------------
    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: Key) -> bool:
        return key in self._parent

    def is_leaf(self, key: Key) -> bool:
        return not self._children.get(key)

    def on_insert(self, key: Key, nbytes: int, parent: Key | None = None, position: int = 0) -> None:
        parents = self._parent
        assert key not in parents, "on_insert of a resident key"
        if parent is not None:
            if parent in parents:
                children = self._children
                n = children.get(parent, 0)
                children[parent] = n + 1
                if n == 0:
                    self._leaf_changed(parent, False)
            else:
                parent = None  # the parent is not in this tier: the chunk is a root here
        parents[key] = parent
        self._inserted(key, nbytes, position)

    def on_remove(self, key: Key) -> None:
        parent = self._parent.pop(key)
        children = self._children
        if key in children:  # removing a non-leaf (an explicit delete): its children become roots
            del children[key]
            for k, p in self._parent.items():
                if p == key:
                    self._parent[k] = None
        if parent is not None:
            n = children[parent] - 1
            if n:
                children[parent] = n
            else:
                del children[parent]
                self._leaf_changed(parent, True)
        self._removed(key)

    def on_access(self, chain: Sequence[Key]) -> None:
        """Touch a request's resident chunks deepest first, so a parent is never 'older' than
        its children in recency-ordered policies."""
        for key in reversed(chain):
            self._hit(key)

    def victim(self, can_evict: Callable[[Key], bool] | None = None) -> Key | None:
        """The next chunk to evict: a leaf for which `can_evict` (None: anything) holds."""
        children = self._children
        for key in self._candidates():
            if key not in children and (can_evict is None or can_evict(key)):
                return key
        return None

    def admit(self, key: Key, nbytes: int, parent: Key | None = None, position: int = 0) -> bool:
        """Whether to store `key` when the tier is full (storing it costs an eviction)."""
        return True

    def pop_victim(self, can_evict: Callable[[Key], bool] | None = None) -> Key | None:
        """`victim` and `on_remove` in one call: the eviction step of a tier."""
        key = self.victim(can_evict)
        if key is not None:
            self.on_remove(key)
        return key

    def pop_victims(self, count: int, pinned: Container[Key] = (), protect: Key | None = None) -> list[Key]:
        """Up to `count` successive `pop_victim`s, never a key in `pinned` nor `protect`: the batch
        eviction step of a tier. Fewer only when no other evictable leaf is left."""
        def can_evict(k):
            return k != protect and k not in pinned

        out = []
        while len(out) < count:
            key = self.pop_victim(can_evict)
            if key is None:
                break
            out.append(key)
        return out

    def on_insert_chain(self, keys: Sequence[Key], sizes: Sequence[int], parent: Key | None = None,
                        position: int = 0, step: int = 0) -> None:
        """`on_insert` for each key of a chain in order: `keys[i]` (none of them resident) has
        parent `keys[i-1]` (the first has `parent`), size `sizes[i]` and starts at token
        `position + i*step`."""
        for i, key in enumerate(keys):
            self.on_insert(key, sizes[i], parent, position + i * step)
            parent = key

    # ---- what a policy implements ------------------------------------------------------------
    def _inserted(self, key: Key, nbytes: int, position: int) -> None:
        raise NotImplementedError

    def _hit(self, key: Key) -> None:
        raise NotImplementedError

    def _removed(self, key: Key) -> None:
        raise NotImplementedError

    def _candidates(self) -> Iterator[Key] | Iterable[Key]:
        """Resident keys, best victim first (may include non-leaves; `victim` skips them)."""
        raise NotImplementedError

    def _leaf_changed(self, key: Key, is_leaf: bool) -> None:
        """Called when a resident key gains its first child or loses its last one."""


class LeafList:
    """Resident leaves in a list with swap-removal: O(1) add, discard and draws by index, for the
    sampled-eviction policies (`hyperbolic`, `lhd`, `learned`), which draw victims only from it."""
    __slots__ = ("_keys", "_at")

    def __init__(self):
        self._keys: list[Key] = []
        self._at: dict[Key, int] = {}        # leaf -> its index in _keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> Key:
        return self._keys[i]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._at

    def set(self, key: Key, is_leaf: bool) -> None:
        """Add `key` (is_leaf) or discard it (not, or no longer, resident)."""
        if is_leaf:
            if key not in self._at:
                self._at[key] = len(self._keys)
                self._keys.append(key)
        elif key in self._at:
            i = self._at.pop(key)
            last = self._keys.pop()
            if last != key:
                self._keys[i] = last
                self._at[last] = i

