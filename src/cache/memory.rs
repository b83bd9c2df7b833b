use quick_cache::sync::Cache;
use quick_cache::Weighter;

use super::CachedOrder;

/// Per-entry bookkeeping beyond key and JSON bytes (ETag, table slot), so the budget reflects
/// what the process really holds.
const ENTRY_OVERHEAD: u64 = 96;

#[derive(Clone)]
struct ByteWeighter;

impl Weighter<Box<str>, CachedOrder> for ByteWeighter {
    fn weight(&self, key: &Box<str>, value: &CachedOrder) -> u64 {
        key.len() as u64 + value.json.len() as u64 + ENTRY_OVERHEAD
    }
}

/// The in-process tier: order JSON ready to send, bounded by bytes.
pub struct MemoryTier {
    cache: Cache<Box<str>, CachedOrder, ByteWeighter>,
    max_bytes: u64,
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        // The estimate only sizes the hash table; the weight bound is what limits memory.
        let estimated_items = (max_bytes / 1024).clamp(1024, 10_000_000) as usize;
        Self {
            cache: Cache::with_weighter(estimated_items, max_bytes, ByteWeighter),
            max_bytes,
        }
    }

    pub fn get(&self, uid: &str) -> Option<CachedOrder> {
        self.cache.get(uid)
    }

    pub fn insert(&self, uid: &str, order: CachedOrder) {
        self.cache.insert(uid.into(), order);
    }

    /// True while another order of `size` bytes fits without evicting anything.
    pub fn has_room_for(&self, size: u64) -> bool {
        self.cache.weight() + size + ENTRY_OVERHEAD <= self.max_bytes
    }

    pub fn entries(&self) -> usize {
        self.cache.len()
    }

    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }
}
