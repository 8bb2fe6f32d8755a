//! Property tests of the block pool under random reserve / fork / truncate / drop sequences:
//! no double free, no leak, reference counts match the tables, free + used = total.

use std::collections::HashMap;

use proptest::prelude::*;
use tandem_kvcache::{BlockPool, BlockTable};

#[derive(Clone, Debug)]
enum Op {
    New,
    Reserve(usize, usize),
    Fork(usize),
    Truncate(usize, usize),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::New),
        (0..8usize, 0..40usize).prop_map(|(t, n)| Op::Reserve(t, n)),
        (0..8usize).prop_map(Op::Fork),
        (0..8usize, 0..60usize).prop_map(|(t, n)| Op::Truncate(t, n)),
        (0..8usize).prop_map(Op::Drop),
    ]
}

fn check(pool: &BlockPool, tables: &[BlockTable]) {
    let mut expected: HashMap<u32, u32> = HashMap::new();
    for t in tables {
        assert!(t.blocks().len() * pool.block_size() >= t.len());
        assert!(t.blocks().len() <= t.len().div_ceil(pool.block_size()));
        for b in t.blocks() {
            *expected.entry(b.0).or_default() += 1;
        }
    }
    for b in 0..pool.num_blocks() as u32 {
        let want = expected.get(&b).copied().unwrap_or(0);
        assert_eq!(
            pool.ref_count(tandem_kvcache::BlockId(b)),
            want,
            "block {b}"
        );
    }
    assert_eq!(pool.num_used(), expected.len(), "free + used = total");
    assert_eq!(
        pool.num_shared(),
        expected.values().filter(|&&n| n > 1).count(),
        "shared-block counter"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn pool_invariants_hold(ops in proptest::collection::vec(op(), 1..60), blocks in 1..24usize, bs in 1..6usize) {
        let pool = BlockPool::new(blocks, bs);
        let mut tables: Vec<BlockTable> = Vec::new();
        for op in ops {
            match op {
                Op::New => tables.push(pool.new_table()),
                Op::Reserve(t, n) if !tables.is_empty() => {
                    let i = t % tables.len();
                    let (free, len, needed) = (pool.num_free(), tables[i].len(), tables[i].blocks_needed(n));
                    match tables[i].reserve(n) {
                        Ok(_) => prop_assert_eq!(tables[i].len(), len + n),
                        Err(_) => {
                            prop_assert!(needed > free);
                            prop_assert_eq!(pool.num_free(), free);
                            prop_assert_eq!(tables[i].len(), len);
                        }
                    }
                }
                Op::Fork(t) if !tables.is_empty() => {
                    let f = tables[t % tables.len()].fork();
                    tables.push(f);
                }
                Op::Truncate(t, n) if !tables.is_empty() => {
                    let i = t % tables.len();
                    tables[i].truncate(n);
                }
                Op::Drop(t) if !tables.is_empty() => {
                    tables.swap_remove(t % tables.len());
                }
                _ => {}
            }
            check(&pool, &tables);
        }
        drop(tables);
        prop_assert_eq!(pool.num_free(), pool.num_blocks(), "everything returns to the pool");
    }
}
