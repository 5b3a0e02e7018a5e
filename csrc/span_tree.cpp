#include "span_tree.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <unordered_map>
#include <unordered_set>

namespace fastalign {

namespace {
std::string span_name(int64_t id) { return "span " + std::to_string(id); }

uint64_t next_plan_serial() {  // process-wide, so that a plan can name only the spans of its own tree
  static std::atomic<uint64_t> last{0};
  return ++last;
}
}  // namespace

SpanTree::SpanTree(int32_t num_blocks, int32_t block_size)
    : block_size_(block_size), allocator_(num_blocks), fill_(num_blocks, 0) {
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
}

const SpanTree::Span& SpanTree::node(int64_t id) const {
  auto it = spans_.find(id);
  if (it == spans_.end()) throw std::invalid_argument("unknown " + span_name(id));
  return it->second;
}

SpanTree::Span& SpanTree::node(int64_t id) {
  auto it = spans_.find(id);
  if (it == spans_.end()) throw std::invalid_argument("unknown " + span_name(id));
  return it->second;
}

SpanTree::Span& SpanTree::live_node(int64_t id, const char* what) {
  auto it = spans_.find(id);
  if (it == spans_.end() || !it->second.live)
    throw std::invalid_argument(std::string(what) + ": " + span_name(id) + " is unknown or was released");
  return it->second;
}

bool SpanTree::is_live(int64_t id) const {
  auto it = spans_.find(id);
  return it != spans_.end() && it->second.live;
}

bool SpanTree::evictable(const Span& s) {
  return s.resident && s.pins == 0 && s.locks == 0 && s.resident_children == 0;
}

void SpanTree::refresh_lru(int64_t id) {
  Span& s = node(id);
  if (s.in_lru) {
    lru_.erase({s.lru_key, id});
    s.in_lru = false;
  }
  if (evictable(s)) {
    lru_.insert({s.last_used, id});
    s.lru_key = s.last_used;
    s.in_lru = true;
  }
}

void SpanTree::touch(int64_t id) {
  node(id).last_used = ++clock_;
  refresh_lru(id);
}

int64_t SpanTree::add_node(int64_t parent, const int32_t* tokens, int64_t n) {
  Span s;  // made whole before it joins the tree: a bad_alloc leaves the tree as it was
  s.parent = parent;
  s.length = (parent >= 0 ? node(parent).length : 0) + n;
  s.tokens.assign(tokens, tokens + n);
  int64_t id = next_id_;
  spans_.emplace(id, std::move(s));
  ++next_id_;
  if (parent >= 0) ++node(parent).num_children;
  return id;
}

std::string SpanTree::exhausted_message() const {
  std::unordered_set<int32_t> pinned_blocks;
  for (const auto& [id, s] : spans_)
    if (s.pins > 0) pinned_blocks.insert(s.blocks.begin(), s.blocks.end());
  return "KV pool exhausted: all " + std::to_string(num_blocks()) + " blocks of " + std::to_string(block_size_) +
         " tokens are held by spans that cannot be evicted (" + std::to_string(pinned_blocks.size()) +
         " by pinned spans, the rest by spans this call uses and their ancestors) and the call needs more; "
         "give the runner a larger pool, unpin or release spans, or extend fewer rows per call";
}

int32_t SpanTree::take_block() {
  int32_t block = allocator_.allocate();
  while (block < 0) {
    if (lru_.empty()) throw PoolExhausted(exhausted_message());
    drop_kv(lru_.begin()->second);
    block = allocator_.allocate();
  }
  fill_[block] = 0;
  return block;
}

void SpanTree::attach(int64_t id, ForwardPlan& plan) {
  Span& s = node(id);
  // The allocations that may throw come first: a bad_alloc there leaves nothing changed.
  s.blocks.reserve(static_cast<size_t>((s.length + block_size_ - 1) / block_size_));
  plan.spans.push_back(id);
  // Resident and locked by the plan from the start, so that abandon() undoes a partial attach like a complete one.
  s.resident = true;
  ++s.locks;
  s.plan = plan.serial;
  int64_t start = 0;
  if (s.parent >= 0) {
    Span& p = node(s.parent);
    ++p.resident_children;
    refresh_lru(s.parent);
    start = p.length;
    int64_t full = start / block_size_;
    for (int64_t i = 0; i < full; ++i) {
      allocator_.incref(p.blocks[i]);
      s.blocks.push_back(p.blocks[i]);
    }
    int32_t offset = static_cast<int32_t>(start % block_size_);
    if (offset != 0) {
      int32_t partial = p.blocks[full];
      if (fill_[partial] == offset) {
        allocator_.incref(partial);
        s.blocks.push_back(partial);
        s.shared_block = partial;
        s.shared_from = s.shared_to = offset;
        p.in_place_child = id;
      } else {
        // all copies happen at once before the forward: a partial block that this plan copies into itself
        // (an earlier row's) holds nothing yet, so copy from where that block is copied from
        int32_t source = partial;
        for (size_t i = 0; i < plan.copy_dst.size(); ++i)
          if (plan.copy_dst[i] == partial) source = plan.copy_src[i];
        // a copier from here: evicting for its block must not give `partial` away to an older copier's copy
        p.copiers.push_back(id);
        int32_t copy = take_block();
        s.blocks.push_back(copy);
        fill_[copy] = offset;
        plan.copy_src.push_back(source);
        plan.copy_dst.push_back(copy);
        // slots of the partial block that this very forward fills (its tokens, or extras of an earlier copy)
        // are not there to copy yet: the forward writes those tokens into the copy as well
        auto also_into_copy = [&](int64_t slot, int64_t token) {
          if (slot / block_size_ == partial && slot % block_size_ < offset) {
            plan.extra_src.push_back(token);
            plan.extra_dst.push_back(static_cast<int64_t>(copy) * block_size_ + slot % block_size_);
          }
        };
        for (size_t t = 0; t < plan.slot_mapping.size(); ++t)
          also_into_copy(plan.slot_mapping[t], static_cast<int64_t>(t));
        for (size_t i = 0, n = plan.extra_dst.size(); i < n; ++i)   // the extras present before this copy's
          also_into_copy(plan.extra_dst[i], plan.extra_src[i]);
      }
    }
  }
  for (int64_t pos = start; pos < s.length; ++pos) {
    size_t index = static_cast<size_t>(pos / block_size_);
    if (index == s.blocks.size()) s.blocks.push_back(take_block());
    int32_t block = s.blocks[index];
    int32_t offset = static_cast<int32_t>(pos % block_size_);
    fill_[block] = offset + 1;
    if (block == s.shared_block) s.shared_to = offset + 1;
    plan.token_ids.push_back(s.tokens[pos - start]);
    plan.positions.push_back(static_cast<int32_t>(pos));
    plan.slot_mapping.push_back(static_cast<int64_t>(block) * block_size_ + offset);
  }
  touch(id);
}

void SpanTree::end_row(int64_t id, ForwardPlan& plan, std::vector<std::vector<int32_t>>& tables) {
  const Span& s = node(id);
  plan.row_spans.push_back(id);
  plan.seq_lens.push_back(static_cast<int32_t>(s.length));
  plan.cu_q_lens.push_back(static_cast<int32_t>(plan.token_ids.size()));
  tables.push_back(s.blocks);
}

void SpanTree::fill_block_table(ForwardPlan& plan, const std::vector<std::vector<int32_t>>& tables) const {
  size_t width = 0;
  for (const auto& t : tables) width = std::max(width, t.size());
  plan.max_blocks = static_cast<int32_t>(width);
  plan.block_table.assign(tables.size() * width, 0);
  for (size_t r = 0; r < tables.size(); ++r)
    std::copy(tables[r].begin(), tables[r].end(), plan.block_table.begin() + r * width);
}

// Attaches each row's spans in order (the last one ends the row). On PoolExhausted the attempt is undone
// and made once more: attach() chose copies against the fills it saw, and evicting a child that had
// appended in place gives its parent's slots back, which can make a copy (and its block) needless. The
// pool is exhausted only once every evictable span is gone, so the second attempt decides on final fills.
ForwardPlan SpanTree::plan_rows(const std::vector<std::vector<int64_t>>& rows) {
  for (int attempt = 0;; ++attempt) {
    ForwardPlan plan;
    plan.serial = next_plan_serial();
    plan.cu_q_lens.push_back(0);
    std::vector<std::vector<int32_t>> tables;
    try {
      for (const auto& row : rows) {
        for (int64_t id : row) attach(id, plan);
        end_row(row.back(), plan, tables);
      }
      fill_block_table(plan, tables);  // the plan's largest allocation: a bad_alloc there is undone like one in attach
    } catch (const PoolExhausted&) {
      abandon(plan);
      if (attempt == 0) continue;
      throw;
    } catch (...) {
      abandon(plan);
      throw;
    }
    return plan;
  }
}

bool SpanTree::holds(const ForwardPlan& plan) const {
  for (int64_t id : plan.spans) {
    auto it = spans_.find(id);
    if (it == spans_.end() || it->second.plan != plan.serial) return false;
  }
  return true;
}

void SpanTree::finish(const ForwardPlan& plan) {
  if (!holds(plan))
    throw std::invalid_argument("finish: the plan is not one this tree runs (already finished or abandoned, or "
                                "another tree's)");
  for (int64_t id : plan.spans) {
    Span& s = node(id);
    s.plan = 0;
    --s.locks;
    refresh_lru(id);
  }
  for (int64_t id : plan.spans)  // a copy the plan made: the block it copied from may go
    if (node(id).parent >= 0) adopt_copy(node(id).parent);
}

void SpanTree::abandon(const ForwardPlan& plan) {
  // All or nothing: everything is checked before the first change. A child that is not the plan's own was
  // made by a later plan on KV this forward never wrote: that plan goes first (a resident child would block
  // dropping the KV, and a span the plan deletes would leave its child without a parent).
  // Whether it is finished is the plan's own mark on its spans: a lock on them may be a later call's.
  if (!holds(plan))
    throw std::invalid_argument("abandon: the plan is not one this tree runs (already finished or abandoned, or "
                                "another tree's)");
  std::unordered_map<int64_t, int32_t> own_children;
  for (int64_t id : plan.spans) {
    const Span& s = node(id);
    if (s.parent >= 0) ++own_children[s.parent];
  }
  for (int64_t id : plan.spans) {
    const Span& s = node(id);
    if (s.resident_children > own_children[id] || (plan.creates_spans && s.num_children > own_children[id]))
      throw std::invalid_argument("abandon: a later plan builds on " + span_name(id) +
                                  "; abandon that plan (or release the spans it made) first");
  }
  for (auto it = plan.spans.rbegin(); it != plan.spans.rend(); ++it) {
    Span& s = node(*it);
    --s.locks;
    drop_kv(*it);
  }
  if (plan.creates_spans)  // newest first: children (of cuts, of earlier rows) before their parents
    for (auto it = plan.spans.rbegin(); it != plan.spans.rend(); ++it) erase_node(*it);
}

void SpanTree::drop_kv(int64_t id) {
  Span& s = node(id);
  if (s.resident_children != 0) throw std::logic_error("drop_kv: " + span_name(id) + " has resident children");
  for (int32_t block : s.blocks) allocator_.decref(block);
  if (s.shared_block >= 0 && fill_[s.shared_block] == s.shared_to) fill_[s.shared_block] = s.shared_from;
  s.shared_block = -1;
  s.plan = 0;
  s.blocks.clear();
  s.blocks.shrink_to_fit();
  s.resident = false;
  refresh_lru(id);
  if (s.parent >= 0) {
    Span& p = node(s.parent);
    --p.resident_children;
    if (p.in_place_child == id) p.in_place_child = -1;
    auto copier = std::find(p.copiers.begin(), p.copiers.end(), id);
    if (copier != p.copiers.end()) p.copiers.erase(copier);
    refresh_lru(s.parent);
    adopt_copy(s.parent);
  }
}

// Frees a partial last block that no child writes into in place any more, while a child holds a copy of it
// (see span_tree.h): the span `id` (or the deepest span writing into its partial last block in place) and every
// ancestor sharing that block take the child's copy, whose slots before the child's tokens hold the same KV.
// Not while a copy of that block is still to be made (a plan still to run copies from it). Called where that can
// change: a child's KV dropped, a copier's plan done.
void SpanTree::adopt_copy(int64_t id) {
  while (true) {
    const Span* s = &node(id);
    if (!s->resident || s->length % block_size_ == 0) return;
    size_t index = static_cast<size_t>(s->length / block_size_);
    int32_t block = s->blocks[index];
    for (; s->in_place_child >= 0; s = &node(id)) {
      if (node(s->in_place_child).length / block_size_ != static_cast<int64_t>(index)) return;  // fills it
      id = s->in_place_child;
    }
    if (s->copiers.empty()) return;
    std::vector<int64_t> holders;  // id and the ancestors that share its block in place
    for (int64_t h = id; h >= 0 && node(h).blocks.size() > index && node(h).blocks[index] == block;
         h = node(h).parent) {
      for (int64_t c : node(h).copiers)
        if (node(c).plan != 0) return;  // its copy is still to be made
      holders.push_back(h);
    }
    Span& bottom = node(id);
    int64_t child = bottom.copiers.front();
    Span& c = node(child);
    int32_t copy = c.blocks[index];
    for (int64_t h : holders) {
      Span& m = node(h);
      m.blocks[index] = copy;
      if (m.shared_block == block) m.shared_block = copy;
      allocator_.incref(copy);
      allocator_.decref(block);
    }
    bottom.copiers.erase(bottom.copiers.begin());
    bottom.in_place_child = child;
    c.shared_block = copy;
    c.shared_from = static_cast<int32_t>(bottom.length % block_size_);
    c.shared_to = static_cast<int32_t>(std::min<int64_t>(c.length - static_cast<int64_t>(index) * block_size_,
                                                          block_size_));
    id = child;  // its own partial last block may now be read only by it and these spans
  }
}

void SpanTree::erase_node(int64_t id) {
  while (true) {
    Span& s = node(id);
    if (s.resident) drop_kv(id);
    int64_t parent = s.parent;
    spans_.erase(id);
    if (parent < 0) return;
    Span& p = node(parent);
    --p.num_children;
    if (p.live || p.num_children > 0) return;
    id = parent;  // a released ancestor that no live span needs any more
  }
}

ForwardPlan SpanTree::plan_extend(const std::vector<int64_t>& parents, const int32_t* tokens, int64_t num_tokens,
                                  const int64_t* cu_lens, const int64_t* cuts, const int64_t* cu_cuts) {
  size_t rows = parents.size();
  if (cu_lens[0] != 0 || cu_lens[rows] != num_tokens)
    throw std::invalid_argument("cu_lens must start at 0 and end at the number of tokens");
  if (cu_cuts != nullptr && cu_cuts[0] != 0) throw std::invalid_argument("cu_cuts must start at 0");
  // Both offset arrays are checked whole first, so that no row reads past cuts or sums a length past int64.
  for (size_t r = 0; r < rows; ++r) {
    if (cu_lens[r + 1] <= cu_lens[r])
      throw std::invalid_argument("token list " + std::to_string(r) + " is empty: a span appends at least one token");
    if (cu_cuts != nullptr && cu_cuts[r + 1] < cu_cuts[r]) throw std::invalid_argument("cu_cuts must not decrease");
  }
  std::vector<int64_t> row_lengths(rows);
  for (size_t r = 0; r < rows; ++r) {
    int64_t start = 0;
    if (parents[r] >= 0) {
      Span& p = live_node(parents[r], "extend");
      if (!p.resident) throw std::invalid_argument("extend: parent " + span_name(parents[r]) + " is not resident");
      start = p.length;
    } else if (parents[r] < -1) {
      // parent -2 - j names row j < r; compared so, -2 - parent cannot overflow (parent INT64_MIN)
      if (parents[r] < -1 - static_cast<int64_t>(r))
        throw std::invalid_argument("row " + std::to_string(r) + ": a parent row must be an earlier row, got parent " +
                                    std::to_string(parents[r]) + " (-2 - j names row j)");
      start = row_lengths[-2 - parents[r]];
    }
    row_lengths[r] = start + cu_lens[r + 1] - cu_lens[r];
    if (start + cu_lens[r + 1] - cu_lens[r] > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("token list " + std::to_string(r) + ": a span may not exceed 2^31 - 1 tokens");
    if (cu_cuts == nullptr) continue;
    int64_t previous = 0;
    for (int64_t k = cu_cuts[r]; k < cu_cuts[r + 1]; ++k) {
      if (cuts[k] <= previous || cuts[k] >= cu_lens[r + 1] - cu_lens[r])
        throw std::invalid_argument("cuts of row " + std::to_string(r) + ": expected increasing offsets in [1, " +
                                    std::to_string(cu_lens[r + 1] - cu_lens[r] - 1) + "], got " +
                                    std::to_string(cuts[k]) + " after " + std::to_string(previous));
      previous = cuts[k];
    }
  }

  std::vector<int64_t> parent_ids;
  for (int64_t p : parents)
    if (p >= 0) parent_ids.push_back(p);
  lock(parent_ids);
  const int64_t first_new = next_id_;
  std::vector<int64_t> cut_spans;
  ForwardPlan plan;
  try {  // from the first lock: any failure (a bad_alloc making a span included) undoes the whole call
    std::vector<std::vector<int64_t>> chains;  // per row: its cut spans, then its child
    for (size_t r = 0; r < rows; ++r) {
      std::vector<int64_t> chain;
      int64_t parent = parents[r] < -1 ? chains[-2 - parents[r]].back() : parents[r];
      int64_t begin = 0, n = cu_lens[r + 1] - cu_lens[r];
      for (int64_t k = cu_cuts ? cu_cuts[r] : 0; k < (cu_cuts ? cu_cuts[r + 1] : 0); ++k) {
        parent = add_node(parent, tokens + cu_lens[r] + begin, cuts[k] - begin);
        chain.push_back(parent);
        cut_spans.push_back(parent);
        begin = cuts[k];
      }
      chain.push_back(add_node(parent, tokens + cu_lens[r] + begin, n - begin));
      chains.push_back(std::move(chain));
    }
    plan = plan_rows(chains);
  } catch (...) {
    // every span made here, newest first (children before parents), listed in a chain or not yet
    for (int64_t id = next_id_ - 1; id >= first_new; --id) erase_node(id);
    unlock(parent_ids);
    throw;
  }
  plan.cut_spans = std::move(cut_spans);
  plan.creates_spans = true;
  unlock(parent_ids);
  for (int64_t p : parent_ids) touch(p);
  return plan;
}

ForwardPlan SpanTree::plan_restore(const std::vector<int64_t>& targets) {
  for (int64_t t : targets) live_node(t, "restore");
  // Paths are chosen against the residency before this round: a span this forward writes is no base.
  std::vector<std::vector<int64_t>> paths;  // each from the target up to its topmost non-resident ancestor
  std::vector<int64_t> bases;               // resident parent of each path's top, or -1
  std::unordered_set<int64_t> tops;
  for (int64_t t : targets) {
    std::vector<int64_t> path;
    int64_t id = t;
    while (id >= 0 && !node(id).resident) {
      path.push_back(id);
      id = node(id).parent;
    }
    if (path.empty() || !tops.insert(path.back()).second) continue;
    paths.push_back(std::move(path));
    bases.push_back(id);
  }
  std::vector<int64_t> locked_bases;
  for (int64_t b : bases)
    if (b >= 0) locked_bases.push_back(b);
  for (auto& path : paths) std::reverse(path.begin(), path.end());  // rows run from the top down
  lock(locked_bases);
  ForwardPlan plan;
  try {
    plan = plan_rows(paths);
  } catch (...) {
    unlock(locked_bases);
    throw;
  }
  unlock(locked_bases);
  return plan;
}

void SpanTree::lock(const std::vector<int64_t>& ids) {
  for (int64_t id : ids) node(id);  // all or nothing
  for (int64_t id : ids) {
    ++node(id).locks;
    refresh_lru(id);
  }
}

void SpanTree::unlock(const std::vector<int64_t>& ids) {
  for (int64_t id : ids)
    if (node(id).locks <= 0) throw std::invalid_argument("unlock: " + span_name(id) + " is not locked");
  // All or nothing also for a span listed more often than it is locked (its plan's lock left out): undo what was
  // done, then refuse.
  for (size_t i = 0; i < ids.size(); ++i) {
    Span& s = node(ids[i]);
    if (--s.locks >= (s.plan != 0 ? 1 : 0)) continue;
    std::string message = "unlock: " + span_name(ids[i]) + " is locked fewer times than it is listed" +
                          (s.plan != 0 ? ", one of its locks being a plan's (lifted by finish or abandon)" : "");
    for (size_t j = 0; j <= i; ++j) ++node(ids[j]).locks;
    throw std::invalid_argument(message);
  }
  for (int64_t id : ids) refresh_lru(id);
}

void SpanTree::pin(int64_t id) {
  Span& s = live_node(id, "pin");
  if (!s.resident) throw std::invalid_argument("pin: " + span_name(id) + " is not resident; restore it first");
  ++s.pins;
  refresh_lru(id);
}

void SpanTree::unpin(int64_t id) {
  Span& s = live_node(id, "unpin");
  if (s.pins == 0) throw std::invalid_argument("unpin: " + span_name(id) + " is not pinned");
  --s.pins;
  refresh_lru(id);
}

void SpanTree::release(int64_t id) {
  Span& s = live_node(id, "release");
  if (s.locks > 0) throw std::invalid_argument("release: " + span_name(id) + " is in use by a running call");
  s.live = false;
  s.pins = 0;
  if (s.num_children == 0)
    erase_node(id);
  else
    refresh_lru(id);
}

void SpanTree::evict(int64_t id) {
  Span& s = live_node(id, "evict");
  if (!s.resident) throw std::invalid_argument("evict: " + span_name(id) + " is not resident");
  if (s.pins > 0) throw std::invalid_argument("evict: " + span_name(id) + " is pinned");
  if (s.locks > 0) throw std::invalid_argument("evict: " + span_name(id) + " is in use by a running call");
  if (s.resident_children > 0)
    throw std::invalid_argument("evict: " + span_name(id) + " has resident children; evict them first");
  drop_kv(id);
}

std::vector<int64_t> SpanTree::span_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(spans_.size());
  for (const auto& entry : spans_) ids.push_back(entry.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::vector<int64_t> SpanTree::lru_order() const {
  std::vector<int64_t> ids;
  for (const auto& entry : lru_) ids.push_back(entry.second);
  return ids;
}

std::vector<int32_t> SpanTree::tokens(int64_t id) const {
  const Span* s = &node(id);
  std::vector<int32_t> out(static_cast<size_t>(s->length));
  while (true) {
    std::copy(s->tokens.begin(), s->tokens.end(), out.begin() + (s->length - static_cast<int64_t>(s->tokens.size())));
    if (s->parent < 0) break;
    s = &node(s->parent);
  }
  return out;
}

}  // namespace fastalign
