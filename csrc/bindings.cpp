// fastalign._C: Python bindings of the host-side data structures. Arrays cross as numpy (copied once).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>

#include "block_allocator.h"
#include "span_tree.h"

namespace py = pybind11;
using fastalign::ForwardPlan;
using fastalign::SpanTree;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
  return py::array_t<T>(static_cast<py::ssize_t>(values.size()), values.data());
}

template <typename T>
using InArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
std::vector<T> to_vector(const InArray<T>& values, const char* name) {
  if (values.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be one-dimensional");
  return std::vector<T>(values.data(), values.data() + values.size());
}

// `values` (an array or a sequence) as an array of T, refusing what forcecast alone let through: an array of
// non-integers (truncated) and integers that T does not hold (wrapped: token 2^40 + 5 became 5). An empty one
// may have any dtype (np.array([]) is float64).
template <typename T>
InArray<T> integers(const py::object& values, const char* name) {
  py::array array = py::array::ensure(values);
  if (!array) throw std::invalid_argument(std::string(name) + ": expected an array of integers");
  // T's own dtype holds its values (the runner's arrays: no min and max to take on the hot path)
  if (array.size() == 0 || array.dtype().is(py::dtype::of<T>())) return InArray<T>::ensure(array);
  char kind = array.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw std::invalid_argument(std::string(name) + ": expected an array of integers, got dtype " +
                                std::string(py::str(array.dtype())));
  py::int_ lowest(array.attr("min")()), highest(array.attr("max")());
  if (lowest < py::int_(std::numeric_limits<T>::min()) || highest > py::int_(std::numeric_limits<T>::max()))
    throw std::invalid_argument(std::string(name) + ": expected values in [" +
                                std::to_string(std::numeric_limits<T>::min()) + ", " +
                                std::to_string(std::numeric_limits<T>::max()) + "], got values from " +
                                std::string(py::str(lowest)) + " to " + std::string(py::str(highest)));
  return InArray<T>::ensure(array);
}

ForwardPlan plan_extend(SpanTree& tree, const py::object& parents_in, const py::object& tokens_in,
                        const py::object& cu_lens_in, const std::optional<py::object>& cuts_in,
                        const std::optional<py::object>& cu_cuts_in) {
  InArray<int64_t> parents = integers<int64_t>(parents_in, "parents");
  InArray<int32_t> tokens = integers<int32_t>(tokens_in, "tokens");
  InArray<int64_t> cu_lens = integers<int64_t>(cu_lens_in, "cu_lens");
  std::optional<InArray<int64_t>> cuts, cu_cuts;
  if (cuts_in.has_value()) cuts = integers<int64_t>(*cuts_in, "cuts");
  if (cu_cuts_in.has_value()) cu_cuts = integers<int64_t>(*cu_cuts_in, "cu_cuts");
  std::vector<int64_t> parent_ids = to_vector(parents, "parents");
  py::ssize_t rows = static_cast<py::ssize_t>(parent_ids.size());
  if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be one-dimensional");
  if (cu_lens.ndim() != 1 || cu_lens.size() != rows + 1)
    throw std::invalid_argument("cu_lens must have one entry more than parents");
  if (cuts.has_value() != cu_cuts.has_value()) throw std::invalid_argument("give both cuts and cu_cuts, or neither");
  if (!cuts.has_value()) return tree.plan_extend(parent_ids, tokens.data(), tokens.size(), cu_lens.data());
  if (cuts->ndim() != 1) throw std::invalid_argument("cuts must be one-dimensional");
  if (cu_cuts->ndim() != 1 || cu_cuts->size() != rows + 1)
    throw std::invalid_argument("cu_cuts must have one entry more than parents");
  if (cu_cuts->data()[rows] != cuts->size()) throw std::invalid_argument("cu_cuts must end at the number of cuts");
  return tree.plan_extend(parent_ids, tokens.data(), tokens.size(), cu_lens.data(), cuts->data(), cu_cuts->data());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastalign host-side data structures: the span tree that owns a paged KV pool";

  py::register_exception<fastalign::PoolExhausted>(m, "PoolExhaustedError", PyExc_RuntimeError)
      .attr("__doc__") = "The KV pool cannot hold what a call needs, even after evicting every evictable span; "
                         "nothing was created. Give the runner a larger pool or extend fewer tokens per call.";

  py::class_<ForwardPlan>(m, "ForwardPlan",
                          "Rows of new tokens whose KV one forward computes, with their paged-attention metadata.")
      .def_property_readonly("creates_spans", [](const ForwardPlan& p) { return p.creates_spans; })
      .def_property_readonly("num_rows", [](const ForwardPlan& p) { return p.row_spans.size(); })
      .def_property_readonly("num_tokens", [](const ForwardPlan& p) { return p.token_ids.size(); })
      .def_property_readonly("row_spans", [](const ForwardPlan& p) { return to_numpy(p.row_spans); })
      .def_property_readonly("cut_spans", [](const ForwardPlan& p) { return to_numpy(p.cut_spans); })
      .def_property_readonly("spans", [](const ForwardPlan& p) { return to_numpy(p.spans); })
      .def_property_readonly("token_ids", [](const ForwardPlan& p) { return to_numpy(p.token_ids); })
      .def_property_readonly("positions", [](const ForwardPlan& p) { return to_numpy(p.positions); })
      .def_property_readonly("slot_mapping", [](const ForwardPlan& p) { return to_numpy(p.slot_mapping); })
      .def_property_readonly("seq_lens", [](const ForwardPlan& p) { return to_numpy(p.seq_lens); })
      .def_property_readonly("cu_q_lens", [](const ForwardPlan& p) { return to_numpy(p.cu_q_lens); })
      .def_property_readonly("block_table",
                             [](const ForwardPlan& p) {
                               py::ssize_t rows = static_cast<py::ssize_t>(p.row_spans.size());
                               return py::array_t<int32_t>({rows, static_cast<py::ssize_t>(p.max_blocks)},
                                                           p.block_table.data());
                             })
      .def_property_readonly("copy_src", [](const ForwardPlan& p) { return to_numpy(p.copy_src); })
      .def_property_readonly("copy_dst", [](const ForwardPlan& p) { return to_numpy(p.copy_dst); })
      .def_property_readonly("extra_src", [](const ForwardPlan& p) { return to_numpy(p.extra_src); })
      .def_property_readonly("extra_dst", [](const ForwardPlan& p) { return to_numpy(p.extra_dst); });

  py::class_<SpanTree>(m, "SpanTree", "Tree of token spans owning the blocks of a paged KV pool (see span_tree.h).")
      .def(py::init<int32_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("plan_extend", &plan_extend, py::arg("parents"), py::arg("tokens"), py::arg("cu_lens"),
           py::arg("cuts") = py::none(), py::arg("cu_cuts") = py::none(),
           "Create one child per row (parent -1: a root; -2 - j: the child of row j < r), and a span at each "
           "cut inside a row (row r's offsets cuts[cu_cuts[r]:cu_cuts[r+1]]), and plan the forward computing "
           "their KV.")
      .def("plan_restore", &SpanTree::plan_restore, py::arg("targets"),
           "One round of recomputing evicted targets and their evicted ancestors; call until num_rows == 0.")
      .def("finish", &SpanTree::finish, py::arg("plan"),
           "The plan's forward is done: lift its locks; its copies count as made.")
      .def("abandon", &SpanTree::abandon, py::arg("plan"),
           "Undo a plan whose forward failed: its spans lose their KV; spans it created are deleted.")
      .def("holds", &SpanTree::holds, py::arg("plan"),
           "Whether the plan is still to finish or abandon (its spans carry its mark).")
      .def("lock", &SpanTree::lock, py::arg("ids"))
      .def("unlock", &SpanTree::unlock, py::arg("ids"))
      .def("pin", &SpanTree::pin, py::arg("id"))
      .def("unpin", &SpanTree::unpin, py::arg("id"))
      .def("release", &SpanTree::release, py::arg("id"))
      .def("evict", &SpanTree::evict, py::arg("id"))
      .def_property_readonly("num_blocks", &SpanTree::num_blocks)
      .def_property_readonly("block_size", &SpanTree::block_size)
      .def_property_readonly("num_free_blocks", &SpanTree::num_free_blocks)
      .def("refcounts", [](const SpanTree& t) { return to_numpy(t.refcounts()); })
      .def("free_blocks", [](const SpanTree& t) { return to_numpy(t.free_blocks()); })
      .def("span_ids", &SpanTree::span_ids)
      .def("lru_order", &SpanTree::lru_order)
      .def("exists", &SpanTree::exists, py::arg("id"))
      .def("is_live", &SpanTree::is_live, py::arg("id"))
      .def("parent", &SpanTree::parent, py::arg("id"))
      .def("length", &SpanTree::length, py::arg("id"))
      .def("new_tokens", [](const SpanTree& t, int64_t id) { return to_numpy(t.new_tokens(id)); }, py::arg("id"))
      .def("tokens", [](const SpanTree& t, int64_t id) { return to_numpy(t.tokens(id)); }, py::arg("id"))
      .def("block_table", [](const SpanTree& t, int64_t id) { return to_numpy(t.block_table(id)); }, py::arg("id"))
      .def("is_resident", &SpanTree::is_resident, py::arg("id"))
      .def("pins", &SpanTree::pins, py::arg("id"))
      .def("locks", &SpanTree::locks, py::arg("id"));
}
