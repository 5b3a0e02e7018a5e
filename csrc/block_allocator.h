// Reference-counted allocator of the fixed-size blocks of a paged KV pool.
//
// A block is free or held; every holder (a resident span whose block table names the block) owns one
// reference. The allocator only counts: it never touches the device memory the blocks stand for.
#pragma once

#include <cstdint>
#include <vector>

namespace fastalign {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

  // A free block with one reference, or -1 when none is free.
  int32_t allocate();
  void incref(int32_t block);
  // Drops one reference; the last one puts the block back on the free list.
  void decref(int32_t block);

  const std::vector<int32_t>& refcounts() const { return refcount_; }
  const std::vector<int32_t>& free_blocks() const { return free_; }

 private:
  void check_held(int32_t block, const char* what) const;

  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;  // used as a stack: the most recently freed block is reused first
};

}  // namespace fastalign
