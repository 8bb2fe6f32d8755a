//! Logical KV-cache bookkeeping: which physical blocks hold which sequence's positions.
//!
//! No tensors live here. A [`BlockPool`] owns `num_blocks` block ids, each holding
//! `block_size` token positions. Free blocks form a singly linked list threaded through a
//! `next` array (index links, no heap nodes), so allocating and freeing are O(1). Every block
//! has a reference count: a block is free exactly when its count is zero.
//!
//! A [`BlockTable`] maps a sequence's positions to blocks: position `p` lives in
//! `blocks[p / block_size]` at slot `p % block_size`. Dropping a table releases its blocks.
//!
//! **Prefix sharing.** When a block of a sequence is full, the caller may register it under a
//! [`BlockHash`]: a hash chain over the bytes of the hidden states that filled it and all the
//! blocks before it. The cloud's KV at a position depends only on the hidden states at and
//! before that position, so two sequences whose chains agree hold identical KV in that block,
//! and a later sequence can adopt the registered block instead of computing it again
//! ([`BlockTable::adopt_prefix`]). A block leaves the registry when its last holder releases it.
//!
//! **Copy-on-write.** Shared blocks are full, and full blocks are never written again, except
//! after [`BlockTable::fork`], which shares a partly filled last block. Before writing into a
//! shared block, [`BlockTable::reserve`] moves the sequence to a fresh block and returns the
//! [`CopyOp`] the storage must perform.
//!
//! The pool sits behind an `Arc<Mutex<_>>` so that tables can release blocks in `Drop`; the
//! engine thread is its only user, so the lock is never contended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// Index of a physical block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Identity of a full block's contents, chained over every block before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 16]);

impl BlockHash {
    /// The hash of a block whose hidden states are `bytes`, following the block hashed `prev`
    /// (`None` for a sequence's first block).
    pub fn chain(prev: Option<BlockHash>, bytes: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(prev.map_or([0u8; 16], |p| p.0));
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
        let d = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        Self(out)
    }
}

/// Whether an allocation can be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocStatus {
    /// Enough free blocks now.
    Ok,
    /// Not now, but the pool is big enough once other sequences release blocks.
    Later,
    /// Never: the request is larger than the whole pool.
    Never,
}

/// Errors of the logical cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("position {pos} is beyond the {len} positions of this sequence")]
    Position { pos: usize, len: usize },
    #[error("prefix blocks can only be adopted by an empty sequence")]
    NotEmpty,
}

/// Copy `len` slots from block `src` to block `dst` (same slot offsets), before writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOp {
    pub src: BlockId,
    pub dst: BlockId,
    pub len: usize,
}

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Inner {
    next: Vec<u32>,
    refs: Vec<u32>,
    free_head: u32,
    num_free: usize,
    registry: HashMap<BlockHash, BlockId>,
    hash_of: Vec<Option<BlockHash>>,
    /// Blocks handed out through `adopt_prefix` (a statistic for reports).
    shared_hits: u64,
    /// Blocks whose count is above one.
    num_shared: usize,
}

impl Inner {
    fn alloc(&mut self) -> Option<BlockId> {
        if self.free_head == NIL {
            return None;
        }
        let id = self.free_head;
        self.free_head = self.next[id as usize];
        self.next[id as usize] = NIL;
        self.refs[id as usize] = 1;
        self.num_free -= 1;
        Some(BlockId(id))
    }

    fn incref(&mut self, b: BlockId) {
        self.refs[b.0 as usize] += 1;
        if self.refs[b.0 as usize] == 2 {
            self.num_shared += 1;
        }
    }

    fn decref(&mut self, b: BlockId) {
        let i = b.0 as usize;
        debug_assert!(self.refs[i] > 0, "double free of block {i}");
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 1 {
            self.num_shared -= 1;
        }
        if self.refs[i] == 0 {
            if let Some(h) = self.hash_of[i].take() {
                if self.registry.get(&h) == Some(&b) {
                    self.registry.remove(&h);
                }
            }
            self.next[i] = self.free_head;
            self.free_head = b.0;
            self.num_free += 1;
        }
    }
}

/// The pool of physical blocks.
#[derive(Clone, Debug)]
pub struct BlockPool {
    inner: Arc<Mutex<Inner>>,
    num_blocks: usize,
    block_size: usize,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave `Inner` half-updated in a way that matters
    // more than losing the engine, so a poisoned lock is simply taken over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` positions (`block_size >= 1`).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks < NIL as usize, "too many blocks");
        let next = (0..num_blocks as u32)
            .map(|i| {
                if i + 1 < num_blocks as u32 {
                    i + 1
                } else {
                    NIL
                }
            })
            .collect();
        let inner = Inner {
            next,
            refs: vec![0; num_blocks],
            free_head: if num_blocks > 0 { 0 } else { NIL },
            num_free: num_blocks,
            registry: HashMap::new(),
            hash_of: vec![None; num_blocks],
            shared_hits: 0,
            num_shared: 0,
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            num_blocks,
            block_size,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        lock(&self.inner).num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks - self.num_free()
    }

    /// Reference count of a block (0 = free).
    pub fn ref_count(&self, b: BlockId) -> u32 {
        lock(&self.inner)
            .refs
            .get(b.0 as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Full blocks registered for prefix sharing.
    pub fn num_registered(&self) -> usize {
        lock(&self.inner).registry.len()
    }

    /// Blocks held by more than one table right now.
    pub fn num_shared(&self) -> usize {
        lock(&self.inner).num_shared
    }

    /// Blocks adopted through prefix sharing since the pool was made.
    pub fn shared_hits(&self) -> u64 {
        lock(&self.inner).shared_hits
    }

    /// Whether `n` more blocks can be had.
    pub fn can_allocate(&self, n: usize) -> AllocStatus {
        if n > self.num_blocks {
            AllocStatus::Never
        } else if n <= self.num_free() {
            AllocStatus::Ok
        } else {
            AllocStatus::Later
        }
    }

    /// An empty table for a new sequence.
    pub fn new_table(&self) -> BlockTable {
        BlockTable {
            pool: self.clone(),
            blocks: Vec::new(),
            hashes: Vec::new(),
            len: 0,
        }
    }
}

/// One sequence's blocks. Releases them when dropped.
#[derive(Debug)]
pub struct BlockTable {
    pool: BlockPool,
    blocks: Vec<BlockId>,
    /// Hash of each registered or adopted full block, in order (a prefix of `blocks`).
    hashes: Vec<BlockHash>,
    len: usize,
}

impl BlockTable {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Block and slot of position `pos`.
    pub fn slot(&self, pos: usize) -> Result<(BlockId, usize), KvError> {
        if pos >= self.len {
            return Err(KvError::Position { pos, len: self.len });
        }
        let bs = self.pool.block_size;
        Ok((self.blocks[pos / bs], pos % bs))
    }

    /// New blocks that appending `n` positions would take (including a copy-on-write block).
    pub fn blocks_needed(&self, n: usize) -> usize {
        let bs = self.pool.block_size;
        let fresh = (self.len + n)
            .div_ceil(bs)
            .saturating_sub(self.blocks.len());
        fresh + usize::from(n > 0 && self.last_block_needs_copy())
    }

    fn last_block_needs_copy(&self) -> bool {
        let partial = !self.len.is_multiple_of(self.pool.block_size);
        partial
            && self
                .blocks
                .last()
                .is_some_and(|&b| self.pool.ref_count(b) > 1)
    }

    /// Makes room for `n` more positions, all or nothing. Returns the copies the storage must
    /// do first (copy-on-write of a shared, partly filled last block).
    pub fn reserve(&mut self, n: usize) -> Result<Vec<CopyOp>, KvError> {
        let needed = self.blocks_needed(n);
        let mut inner = lock(&self.pool.inner);
        if needed > inner.num_free {
            return Err(KvError::OutOfBlocks {
                needed,
                free: inner.num_free,
            });
        }
        let mut copies = Vec::new();
        if n > 0 && !self.len.is_multiple_of(self.pool.block_size) {
            if let Some(last) = self.blocks.last_mut() {
                if inner.refs[last.0 as usize] > 1 {
                    let fresh = inner
                        .alloc()
                        .ok_or(KvError::OutOfBlocks { needed, free: 0 })?;
                    copies.push(CopyOp {
                        src: *last,
                        dst: fresh,
                        len: self.len % self.pool.block_size,
                    });
                    inner.decref(*last);
                    *last = fresh;
                }
            }
        }
        let bs = self.pool.block_size;
        while self.blocks.len() * bs < self.len + n {
            let b = inner
                .alloc()
                .ok_or(KvError::OutOfBlocks { needed, free: 0 })?;
            self.blocks.push(b);
        }
        self.len += n;
        Ok(copies)
    }

    /// Drops positions from `new_len` on, releasing blocks no longer needed.
    ///
    /// A registered full block that the cut leaves partly filled, and that no other table
    /// holds, leaves the registry: this table will write new positions into it, so it no
    /// longer holds what its hash says (a block other tables hold is copied before this one
    /// writes into it, see [`Self::reserve`], and keeps its registration).
    pub fn truncate(&mut self, new_len: usize) {
        if new_len >= self.len {
            return;
        }
        let keep = new_len.div_ceil(self.pool.block_size);
        let mut inner = lock(&self.pool.inner);
        for b in self.blocks.drain(keep..) {
            inner.decref(b);
        }
        if !new_len.is_multiple_of(self.pool.block_size) {
            if let Some(&b) = self.blocks.last() {
                let i = b.0 as usize;
                if inner.refs[i] == 1 {
                    if let Some(h) = inner.hash_of[i].take() {
                        if inner.registry.get(&h) == Some(&b) {
                            inner.registry.remove(&h);
                        }
                    }
                }
            }
        }
        self.hashes.truncate(new_len / self.pool.block_size);
        self.len = new_len;
    }

    /// A second table over the same blocks (each shared block's count goes up by one).
    pub fn fork(&self) -> BlockTable {
        let mut inner = lock(&self.pool.inner);
        for &b in &self.blocks {
            inner.incref(b);
        }
        BlockTable {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
            hashes: self.hashes.clone(),
            len: self.len,
        }
    }

    /// Hashes of the full blocks registered or adopted so far.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }

    /// Registers full block number `index` (which must follow the last registered one) under
    /// `hash`, so that other sequences can adopt it. A hash already registered by another
    /// block keeps its first block.
    pub fn register_full_block(&mut self, index: usize, hash: BlockHash) -> Result<(), KvError> {
        let bs = self.pool.block_size;
        if index != self.hashes.len() || (index + 1) * bs > self.len {
            return Err(KvError::Position {
                pos: (index + 1) * bs,
                len: self.len,
            });
        }
        let b = self.blocks[index];
        let mut inner = lock(&self.pool.inner);
        if let std::collections::hash_map::Entry::Vacant(slot) = inner.registry.entry(hash) {
            slot.insert(b);
            inner.hash_of[b.0 as usize] = Some(hash);
        }
        self.hashes.push(hash);
        Ok(())
    }

    /// For an empty table: takes over the longest run of registered blocks matching `hashes`
    /// (the chain of the sequence's leading full blocks). Returns the positions now covered,
    /// whose KV need not be computed.
    pub fn adopt_prefix(&mut self, hashes: &[BlockHash]) -> Result<usize, KvError> {
        if !self.is_empty() {
            return Err(KvError::NotEmpty);
        }
        let mut inner = lock(&self.pool.inner);
        for h in hashes {
            let Some(&b) = inner.registry.get(h) else {
                break;
            };
            inner.incref(b);
            inner.shared_hits += 1;
            self.blocks.push(b);
            self.hashes.push(*h);
        }
        self.len = self.blocks.len() * self.pool.block_size;
        Ok(self.len)
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        let mut inner = lock(&self.pool.inner);
        for b in self.blocks.drain(..) {
            inner.decref(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing_and_frees_on_drop() {
        let pool = BlockPool::new(4, 16);
        let mut a = pool.new_table();
        assert_eq!(a.blocks_needed(17), 2);
        a.reserve(17).expect("fits");
        assert_eq!(pool.num_free(), 2);
        assert_eq!(a.slot(16).expect("slot"), (a.blocks()[1], 0));
        assert!(a.slot(17).is_err());
        let mut b = pool.new_table();
        let err = b.reserve(3 * 16).expect_err("too big");
        assert_eq!(err, KvError::OutOfBlocks { needed: 3, free: 2 });
        assert_eq!(pool.num_free(), 2, "failed reserve takes nothing");
        assert_eq!(pool.can_allocate(3), AllocStatus::Later);
        assert_eq!(pool.can_allocate(5), AllocStatus::Never);
        drop(a);
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.can_allocate(3), AllocStatus::Ok);
    }

    #[test]
    fn fork_shares_and_copy_on_write_splits_the_partial_block() {
        let pool = BlockPool::new(8, 4);
        let mut a = pool.new_table();
        a.reserve(6).expect("fits"); // one full block + 2 slots
        let mut b = a.fork();
        assert_eq!(pool.num_used(), 2);
        assert_eq!(pool.ref_count(a.blocks()[1]), 2);
        assert_eq!(b.blocks_needed(1), 1, "copy of the shared partial block");
        let copies = b.reserve(1).expect("fits");
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].src, a.blocks()[1]);
        assert_eq!(copies[0].len, 2);
        assert_ne!(b.blocks()[1], a.blocks()[1]);
        assert_eq!(b.blocks()[0], a.blocks()[0], "full block still shared");
        assert_eq!(pool.ref_count(a.blocks()[1]), 1);
        // Appending to a now-unshared partial block needs no copy.
        assert!(a.reserve(1).expect("fits").is_empty());
        drop(a);
        drop(b);
        assert_eq!(pool.num_free(), 8);
    }

    #[test]
    fn prefix_blocks_are_shared_through_the_hash_chain() {
        let pool = BlockPool::new(8, 2);
        let h1 = BlockHash::chain(None, b"system-a");
        let h2 = BlockHash::chain(Some(h1), b"system-b");
        let mut a = pool.new_table();
        a.reserve(5).expect("fits");
        a.register_full_block(0, h1).expect("full");
        a.register_full_block(1, h2).expect("full");
        assert!(a.register_full_block(2, h2).is_err(), "block 2 is not full");
        let mut b = pool.new_table();
        // b's chain diverges at the second block: only the first is adopted.
        let other = BlockHash::chain(Some(h1), b"other");
        assert_eq!(b.adopt_prefix(&[h1, other]).expect("empty"), 2);
        assert_eq!(b.blocks()[0], a.blocks()[0]);
        assert_eq!(pool.shared_hits(), 1);
        let mut c = pool.new_table();
        assert_eq!(c.adopt_prefix(&[h1, h2]).expect("empty"), 4);
        assert_eq!(pool.ref_count(a.blocks()[0]), 3);
        assert!(c.adopt_prefix(&[h1]).is_err(), "only an empty table adopts");
        // The registry forgets a block once nobody holds it.
        drop(a);
        drop(c);
        assert_eq!(pool.num_registered(), 1);
        drop(b);
        assert_eq!(pool.num_registered(), 0);
        assert_eq!(pool.num_free(), 8);
        // Different content, different hash; same content and predecessor, same hash.
        assert_ne!(BlockHash::chain(None, b"x"), BlockHash::chain(None, b"y"));
        assert_eq!(
            BlockHash::chain(Some(h1), b"z"),
            BlockHash::chain(Some(h1), b"z")
        );
        assert_ne!(
            BlockHash::chain(Some(h1), b"z"),
            BlockHash::chain(Some(h2), b"z")
        );
    }

    #[test]
    fn truncate_releases_whole_blocks_only() {
        let pool = BlockPool::new(4, 4);
        let mut a = pool.new_table();
        a.reserve(10).expect("fits");
        a.truncate(5);
        assert_eq!(a.len(), 5);
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(pool.num_free(), 2);
        a.truncate(0);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn a_cut_into_a_registered_block_unregisters_it_unless_shared() {
        let pool = BlockPool::new(4, 4);
        let h = BlockHash::chain(None, b"block 0");
        let mut t = pool.new_table();
        t.reserve(6).expect("fits");
        t.register_full_block(0, h).expect("full");
        assert_eq!(pool.num_registered(), 1);
        // Cut at a block boundary: the full block stays as it is, and registered.
        t.truncate(4);
        assert_eq!(pool.num_registered(), 1);
        // Cut inside it: new positions will overwrite its tail, so nobody may adopt it.
        t.truncate(3);
        assert_eq!(pool.num_registered(), 0);
        assert!(t.hashes().is_empty());
        let mut late = pool.new_table();
        assert_eq!(late.adopt_prefix(&[h]).expect("adopt"), 0);

        // Held by another table too: this table copies before writing, so it stays.
        let mut a = pool.new_table();
        a.reserve(4).expect("fits");
        a.register_full_block(0, h).expect("full");
        let mut b = pool.new_table();
        assert_eq!(b.adopt_prefix(&[h]).expect("adopt"), 4);
        a.truncate(2);
        assert_eq!(pool.num_registered(), 1);
        assert_eq!(a.reserve(1).expect("fits").len(), 1, "copy-on-write");
    }
}
