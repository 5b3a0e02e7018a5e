#include "block_allocator.h"

#include <stdexcept>
#include <string>

namespace fastalign {

BlockAllocator::BlockAllocator(int32_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive, got " + std::to_string(num_blocks));
  refcount_.assign(num_blocks, 0);
  free_.reserve(num_blocks);
  // Reversed so that the first allocations return blocks 0, 1, 2, ...
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) return -1;
  int32_t block = free_.back();
  free_.pop_back();
  refcount_[block] = 1;
  return block;
}

void BlockAllocator::check_held(int32_t block, const char* what) const {
  if (block < 0 || block >= num_blocks())
    throw std::logic_error(std::string(what) + ": block " + std::to_string(block) + " out of range");
  if (refcount_[block] <= 0)
    throw std::logic_error(std::string(what) + ": block " + std::to_string(block) + " is free");
}

void BlockAllocator::incref(int32_t block) {
  check_held(block, "incref");
  ++refcount_[block];
}

void BlockAllocator::decref(int32_t block) {
  check_held(block, "decref");
  if (--refcount_[block] == 0) free_.push_back(block);
}

}  // namespace fastalign
