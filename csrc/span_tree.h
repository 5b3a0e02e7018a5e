// The tree of token spans that owns a paged KV pool: host-side bookkeeping only (no device memory).
//
// A span is its parent span plus the tokens appended to it; its tokens never change. A resident span has
// a block table covering ALL its tokens, root included:
//   - the parent's full blocks are shared (one more reference each);
//   - a parent that ends mid-block hands its partial last block to the first child that appends to it
//     ("in place": the child writes the free slots after the parent's tokens). Every later child gets a
//     fresh block and a copy of the parent's partial block (copy-on-write: the plan lists (src, dst) and
//     the runner copies on the device before the forward). A block's fill (its written slots) decides
//     which case applies, so at most one span ever writes a given slot while a reader relies on it;
//   - its own tokens go to blocks allocated from the pool.
// Once no child writes into a partial last block in place any more (that child's KV was dropped), the block
// is read only by its span and the ancestors that share it, while a child's copy holds the same KV in those
// slots: they take the copy instead (the copying child becomes the in-place one) and the block goes back to
// the pool. Otherwise it would stay for as long as any descendant is resident, read by none of them.
//
// Residency is closed under ancestors: a resident span's parent is resident. Eviction is a cache policy:
// it drops the KV of a least-recently-used resident span that has no resident child, is not pinned and is
// not in use by the current call, but keeps the span and its tokens. A span that is used again after
// eviction is recomputed first (plan_restore), so eviction changes no result beyond
// rounding (a span recomputed in another batch); it only costs compute.
//
// Releasing a span ends its handle. Its node (and KV) stays only while live descendants need it as their
// prefix; the last such release frees it. Reference counts equal the number of resident spans whose block
// table names each block; a block returns to the pool when no resident span names it, or when its spans
// take a child's copy of it (above).
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_allocator.h"

namespace fastalign {

// The pool cannot hold what a call needs even after evicting every evictable span.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Everything a forward pass needs to compute the KV (and outputs) of the spans it attaches, as rows of
// packed new tokens. Row r's tokens are token_ids[cu_q_lens[r]:cu_q_lens[r+1]].
struct ForwardPlan {
  std::vector<int64_t> row_spans;     // [R] the span whose last token ends each row
  std::vector<int64_t> cut_spans;     // spans that plan_extend created at cuts inside rows, row by row
  std::vector<int64_t> spans;         // every span given KV by this plan, in order; each locked by the plan
                                      // until finish() or abandon()
  std::vector<int32_t> token_ids;     // [T]
  std::vector<int32_t> positions;     // [T] position of each new token in its sequence
  std::vector<int64_t> slot_mapping;  // [T] block * block_size + offset where each new token's KV goes
  std::vector<int32_t> seq_lens;      // [R] context length of each row, its new tokens included
  std::vector<int32_t> cu_q_lens;     // [R + 1]
  std::vector<int32_t> block_table;   // [R, max_blocks] row-major; entries past a row's blocks are 0
  int32_t max_blocks = 0;
  std::vector<int32_t> copy_src;      // [C] copy block copy_src[i] into copy_dst[i] before the forward
  std::vector<int32_t> copy_dst;      // [C]
  std::vector<int64_t> extra_src;     // [E] the forward writes the K/V of token extra_src[i] to slot extra_dst[i]
  std::vector<int64_t> extra_dst;     //     too: a copied block's slots that this very forward fills
  bool creates_spans = false;         // from plan_extend: the row spans are new
  uint64_t serial = 0;                // names the plan in the spans it holds (unique in the process)
};

class SpanTree {
 public:
  SpanTree(int32_t num_blocks, int32_t block_size);

  // Creates one child per row (parent -1 makes a root) holding tokens[cu_lens[r]:cu_lens[r+1]] and plans
  // the forward that computes their KV; the children are touched (most recently used), and so are the
  // parents. Parents must be live and resident. On PoolExhausted nothing is created and every parent keeps
  // its KV (other spans may have been evicted on the way: eviction changes no result beyond rounding).
  // A parent -2 - j (j < r) is the child of row j of the same call: row r attends to row j's tokens,
  // which the same forward computes (and writes twice where a block of theirs is copied for row r, see
  // extra_src), so rows that build on one another still cost one forward and no recomputed token.
  // Cuts (optional, cu_cuts null for none): row r's offsets cuts[cu_cuts[r]:cu_cuts[r+1]], increasing and
  // strictly inside the row, each end a span inside the row: the chain parent -> span of the first c1
  // tokens -> span of the next ones -> ... -> the row's child, all computed by the row in the same forward
  // (listed in plan.cut_spans), so a row's intermediate prefixes become spans without extra tokens.
  ForwardPlan plan_extend(const std::vector<int64_t>& parents, const int32_t* tokens, int64_t num_tokens,
                          const int64_t* cu_lens, const int64_t* cuts = nullptr, const int64_t* cu_cuts = nullptr);
  // One round of recomputing evicted spans: for each target that is not resident, the path from its
  // topmost non-resident ancestor down to it becomes one row, at most one row per such ancestor (a span
  // whose KV this very forward writes cannot be copied from). Call until the plan has no rows.
  ForwardPlan plan_restore(const std::vector<int64_t>& targets);

  // The forward of a plan is done: lifts the plan's locks, and its copies count as made (a block they copied
  // from may go). Refuses, changing nothing, a plan already finished or abandoned.
  void finish(const ForwardPlan& plan);

  // Undoes a plan whose forward failed: its spans lose their KV (newest first, so that blocks shared in
  // place go back to their earlier fill) and lose the plan's locks; spans it created (cut spans included)
  // are deleted. Refuses, changing nothing, a plan already finished or abandoned (whatever locks its spans
  // hold since) or one that a later plan builds on (abandon that one first).
  void abandon(const ForwardPlan& plan);

  // Whether the plan is still to finish or abandon: each of its spans carries its mark.
  bool holds(const ForwardPlan& plan) const;

  // Locked spans are never evicted: the runner locks what a call uses until its forward is done. Locks count
  // every listing (a span listed twice is locked twice); unlock refuses, changing nothing, any span it lists
  // more often than the span is locked, not counting the lock of a plan still to finish (finish or abandon
  // lifts that one).
  void lock(const std::vector<int64_t>& ids);
  void unlock(const std::vector<int64_t>& ids);
  // Pins nest: a span stays resident while pinned at least once. Pinning needs a resident span.
  void pin(int64_t id);
  void unpin(int64_t id);
  // Ends the handle (and its pins); frees the span's node and KV once no live descendant needs them.
  void release(int64_t id);
  // Drops the KV of a resident span that has no resident child, is not pinned and not locked.
  void evict(int64_t id);

  int32_t num_blocks() const { return allocator_.num_blocks(); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free_blocks() const { return allocator_.num_free(); }
  const std::vector<int32_t>& refcounts() const { return allocator_.refcounts(); }
  const std::vector<int32_t>& free_blocks() const { return allocator_.free_blocks(); }

  std::vector<int64_t> span_ids() const;  // every node, released ancestors of live spans included
  std::vector<int64_t> lru_order() const; // evictable spans, least recently used first
  bool exists(int64_t id) const { return spans_.count(id) != 0; }
  bool is_live(int64_t id) const;
  int64_t parent(int64_t id) const { return node(id).parent; }
  int64_t length(int64_t id) const { return node(id).length; }
  const std::vector<int32_t>& new_tokens(int64_t id) const { return node(id).tokens; }
  std::vector<int32_t> tokens(int64_t id) const;  // root through this span
  const std::vector<int32_t>& block_table(int64_t id) const { return node(id).blocks; }
  bool is_resident(int64_t id) const { return node(id).resident; }
  int32_t pins(int64_t id) const { return node(id).pins; }
  int32_t locks(int64_t id) const { return node(id).locks; }

 private:
  struct Span {
    int64_t parent = -1;
    int64_t length = 0;           // tokens from the root through this span
    std::vector<int32_t> tokens;  // this span's own tokens
    std::vector<int32_t> blocks;  // block table over all `length` tokens; empty unless resident
    bool resident = false;
    bool live = true;             // false once released
    int32_t pins = 0;
    int32_t locks = 0;
    int32_t num_children = 0;
    int32_t resident_children = 0;
    // Resident children that hold their own copy of this span's partial last block, and the resident child
    // that writes into that block in place (-1 for none).
    std::vector<int64_t> copiers;
    int64_t in_place_child = -1;
    // The serial of the plan that gave this span its KV and holds one of its locks, while that plan is still to
    // finish (its copy of the parent's partial block still to be made); 0 once it finished or the KV is dropped.
    uint64_t plan = 0;
    uint64_t last_used = 0;
    bool in_lru = false;
    uint64_t lru_key = 0;
    // The parent's partial last block when this span appended to it in place: fill went from
    // shared_from to shared_to, and goes back when this span's KV is dropped.
    int32_t shared_block = -1;
    int32_t shared_from = 0;
    int32_t shared_to = 0;
  };

  const Span& node(int64_t id) const;
  Span& node(int64_t id);
  Span& live_node(int64_t id, const char* what);

  int64_t add_node(int64_t parent, const int32_t* tokens, int64_t n);
  void attach(int64_t id, ForwardPlan& plan);
  void end_row(int64_t id, ForwardPlan& plan, std::vector<std::vector<int32_t>>& tables);
  void fill_block_table(ForwardPlan& plan, const std::vector<std::vector<int32_t>>& tables) const;
  ForwardPlan plan_rows(const std::vector<std::vector<int64_t>>& rows);
  int32_t take_block();
  void drop_kv(int64_t id);
  void adopt_copy(int64_t id);
  void erase_node(int64_t id);
  void touch(int64_t id);
  void refresh_lru(int64_t id);
  static bool evictable(const Span& s);
  std::string exhausted_message() const;

  int32_t block_size_;
  BlockAllocator allocator_;
  std::vector<int32_t> fill_;  // per block: slots written so far (0 for a fresh block)
  std::unordered_map<int64_t, Span> spans_;
  std::set<std::pair<uint64_t, int64_t>> lru_;  // (last_used, id) of evictable spans
  int64_t next_id_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace fastalign
