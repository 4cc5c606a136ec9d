// The per-tensor checks of a memoized optimizer step (core/optimizer.py, StepMemo), one
// C++ loop per list. From Python each property of each tensor (a data_ptr(), numel(),
// dtype or is_contiguous()) costs about 45 ns through torch's bindings, 12-17 µs a pass
// over 300 tensors, which made up most of such a step's host time; here a pass reads all
// of them at a few ns a tensor. core/backends/host_checks.py builds this module against
// the running torch and falls back to the same checks in Python.
//
// Every entry point takes Python objects and checks each before reading it as a tensor:
// anything unexpected answers None (the optimizer then takes its full path, which names
// what is wrong), never a crash.
//
// Built against torch, it also hands the fused CPU kernels torch's own parallel_for
// (share_runner), so a multi-threaded step runs on the threads torch's operations use.
// That needs this file compiled with OpenMP and linked to the OpenMP runtime torch runs
// on: parallel_for's OpenMP loop is inline, and without either it would run serially
// or on a second pool of threads. host_checks.py builds it so where it can, and uses the
// runner only where openmp_runtime() is torch's own.

#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#endif

namespace {

PyObject* plain_types[2] = {nullptr, nullptr};  // torch.Tensor, torch.nn.Parameter

// A torch.Tensor or Parameter that is not nested: a nested tensor has the same type and
// strided layout, but asking its sizes or strides throws, which ended the process here.
bool is_plain_tensor(PyObject* object) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(object));
  return (type == plain_types[0] || type == plain_types[1]) &&
         !THPVariable_Unpack(object).is_nested();
}

// Whether a tensor's memory holds its values in order, as a kernel reads them: contiguous,
// with neither the negative nor the conjugate bit (memory holding the values negated or
// conjugated) and not a ZeroTensor (no memory at all): core.backends.views.lazy_values.
bool holds_values_in_order(const at::Tensor& tensor) {
  return tensor.is_contiguous() && !tensor.is_neg() && !tensor.is_conj() &&
         !tensor._is_zerotensor();
}

// Whether a tensor's storage holds every element its sizes, strides and offset address:
// one freed with untyped_storage().resize_(0) (as FSDP frees unsharded parameters) has
// address 0, and one shrunk has too few bytes; a kernel handed either crashes the process.
// A meta tensor has no data by design (refused by device elsewhere).
bool backed(const at::Tensor& tensor) {
  if (tensor.numel() == 0 || tensor.is_meta()) return true;
  if (!tensor.has_storage()) return false;
  int64_t last = tensor.storage_offset();
  for (int64_t d = 0; d < tensor.dim(); ++d) last += (tensor.size(d) - 1) * tensor.stride(d);
  const c10::Storage& storage = tensor.storage();
  return storage.data() != nullptr &&
         static_cast<size_t>(last + 1) * tensor.itemsize() <= storage.nbytes();
}

// Whether a non-empty tensor starts where another does: a gradient in its parameter's
// memory, which the step writes. Read from the storages (data_ptr() throws for some
// tensors without data); a tensor without data starts nowhere.
bool starts_in(const at::Tensor& tensor, const at::Tensor& other) {
  if (tensor.numel() == 0 || !tensor.has_storage() || !other.has_storage()) return false;
  const char* base = static_cast<const char*>(tensor.storage().data());
  const char* other_base = static_cast<const char*>(other.storage().data());
  if (base == nullptr || other_base == nullptr) return false;
  return base + tensor.storage_offset() * tensor.itemsize() ==
         other_base + other.storage_offset() * other.itemsize();
}

// What a memo vouches for of each tensor: its address, its element count, its shape (the
// number of dimensions, then each size: the shape checks of the full path, and the rows
// of the 8-bit block layout, hold while it does), its dtype and whether it holds its
// values in order in storage that holds them all. A backend that reuses what it worked out
// for a memo's tensors (core.backends.checked) relies on all of them: no tensor of the
// step was resized, reshaped (a `.data =` view of the same elements in another shape
// included), transposed or viewed as another type in place. Descriptions are only
// compared whole; the dimension count before the sizes keeps a sequence of them
// unambiguous.
void describe(const at::Tensor& tensor, std::vector<int64_t>& out) {
  out.push_back(reinterpret_cast<int64_t>(tensor.data_ptr()));
  out.push_back(tensor.numel());
  out.push_back(tensor.dim());
  for (const int64_t size : tensor.sizes()) out.push_back(size);
  out.push_back(static_cast<int64_t>(tensor.scalar_type()));
  out.push_back(holds_values_in_order(tensor) && backed(tensor) ? 1 : 0);
}

// Numbers per description besides one per dimension. An absent state is described as
// this many zeros: a tensor of no dimensions and no elements, which none is (a tensor of
// no dimensions holds one element).
constexpr int FIXED_FIELDS = 5;
constexpr int USUAL_FIELDS = FIXED_FIELDS + 2;  // reserved per tensor: most have two

PyObject* as_bytes(const std::vector<int64_t>& values) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(values.data()),
                                   static_cast<Py_ssize_t>(values.size() * sizeof(int64_t)));
}

// set_plain_types(tensor_type, parameter_type): the exact types a memo accepts.
PyObject* set_plain_types(PyObject*, PyObject* args) {
  PyObject* tensor_type = nullptr;
  PyObject* parameter_type = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &tensor_type, &PyType_Type,
                        &parameter_type)) {
    return nullptr;
  }
  Py_XDECREF(plain_types[0]);
  Py_XDECREF(plain_types[1]);
  Py_INCREF(tensor_type);
  Py_INCREF(parameter_type);
  plain_types[0] = tensor_type;
  plain_types[1] = parameter_type;
  Py_RETURN_NONE;
}

// parameter_layout(params): bytes of each tensor's description (see describe), or None if
// any is not a plain strided tensor with storage.
PyObject* parameter_layout(PyObject*, PyObject* sequence) {
  PyObject* items = PySequence_Fast(sequence, "parameter_layout takes a sequence");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject** objects = PySequence_Fast_ITEMS(items);
  std::vector<int64_t> layout;
  layout.reserve(USUAL_FIELDS * count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain_tensor(objects[i])) {
      Py_DECREF(items);
      Py_RETURN_NONE;
    }
    const at::Tensor& tensor = THPVariable_Unpack(objects[i]);
    if (tensor.layout() != c10::kStrided || !tensor.has_storage()) {
      Py_DECREF(items);
      Py_RETURN_NONE;
    }
    describe(tensor, layout);
  }
  Py_DECREF(items);
  return as_bytes(layout);
}

// column_addresses(states, key, column): bytes of each column tensor's description (see
// describe) if every states[i][key] is column[i] itself (a tensor with storage), else
// None. A None in the column stands for a state without the key (described as zeros): an
// 8-bit moment's full-precision key, or the codes of a moment kept in full precision.
PyObject* column_addresses(PyObject*, PyObject* args) {
  PyObject* states = nullptr;
  PyObject* key = nullptr;
  PyObject* column = nullptr;
  if (!PyArg_ParseTuple(args, "O!UO!", &PyTuple_Type, &states, &key, &PyTuple_Type, &column)) {
    return nullptr;
  }
  const Py_ssize_t count = PyTuple_GET_SIZE(states);
  if (PyTuple_GET_SIZE(column) != count) Py_RETURN_NONE;
  std::vector<int64_t> addresses;
  addresses.reserve(USUAL_FIELDS * count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* state = PyTuple_GET_ITEM(states, i);
    PyObject* expected = PyTuple_GET_ITEM(column, i);
    if (!PyDict_Check(state)) Py_RETURN_NONE;
    PyObject* value = PyDict_GetItemWithError(state, key);  // borrowed
    if (value == nullptr && PyErr_Occurred()) return nullptr;
    if (expected == Py_None) {
      if (value != nullptr && value != Py_None) Py_RETURN_NONE;
      addresses.insert(addresses.end(), FIXED_FIELDS, 0);
      continue;
    }
    if (value != expected || !THPVariable_Check(value)) Py_RETURN_NONE;
    const at::Tensor& tensor = THPVariable_Unpack(value);
    // a nested tensor throws when its sizes are read (describe)
    if (tensor.is_nested() || tensor.layout() != c10::kStrided || !tensor.has_storage())
      Py_RETURN_NONE;
    describe(tensor, addresses);
  }
  return as_bytes(addresses);
}

// gradient_addresses(grads, params): bytes of each gradient's address if every gradient
// is a plain, strided tensor with storage holding its values in order (all of them), of
// its parameter's dtype, shape and device, not starting where its parameter does (the
// step writes that memory), else None.
PyObject* gradient_addresses(PyObject*, PyObject* args) {
  PyObject* grads = nullptr;
  PyObject* params = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &grads, &params)) return nullptr;
  PyObject* grad_items = PySequence_Fast(grads, "gradient_addresses takes sequences");
  if (grad_items == nullptr) return nullptr;
  PyObject* param_items = PySequence_Fast(params, "gradient_addresses takes sequences");
  if (param_items == nullptr) {
    Py_DECREF(grad_items);
    return nullptr;
  }
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(grad_items);
  PyObject* result = nullptr;
  if (PySequence_Fast_GET_SIZE(param_items) == count) {
    PyObject** grad_objects = PySequence_Fast_ITEMS(grad_items);
    PyObject** param_objects = PySequence_Fast_ITEMS(param_items);
    std::vector<int64_t> addresses;
    addresses.reserve(count);
    bool all_fit = true;
    for (Py_ssize_t i = 0; i < count && all_fit; ++i) {
      if (!is_plain_tensor(grad_objects[i]) || !is_plain_tensor(param_objects[i])) {
        all_fit = false;
        break;
      }
      const at::Tensor& grad = THPVariable_Unpack(grad_objects[i]);
      const at::Tensor& param = THPVariable_Unpack(param_objects[i]);
      all_fit = grad.layout() == c10::kStrided && grad.has_storage() &&
                holds_values_in_order(grad) && grad.scalar_type() == param.scalar_type() &&
                grad.sizes() == param.sizes() && grad.device() == param.device() &&
                backed(grad) && !starts_in(grad, param);
      if (all_fit) addresses.push_back(reinterpret_cast<int64_t>(grad.data_ptr()));
    }
    if (all_fit) result = as_bytes(addresses);
  }
  Py_DECREF(grad_items);
  Py_DECREF(param_items);
  if (result == nullptr && !PyErr_Occurred()) Py_RETURN_NONE;
  return result;
}

// first_unbacked(tensors): the index of the first plain tensor whose storage does not hold
// all its elements (see backed), or -1; other objects (DTensors) are not asked.
PyObject* first_unbacked(PyObject*, PyObject* sequence) {
  PyObject* items = PySequence_Fast(sequence, "first_unbacked takes a sequence");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject** objects = PySequence_Fast_ITEMS(items);
  Py_ssize_t found = -1;
  for (Py_ssize_t i = 0; i < count && found < 0; ++i) {
    if (is_plain_tensor(objects[i]) && !backed(THPVariable_Unpack(objects[i]))) found = i;
  }
  Py_DECREF(items);
  return PyLong_FromSsize_t(found);
}

// cpu_kernel.c's share_runner_t: run(work + j·size) for each of `shares` shares, on
// torch's intra-op threads (serially inside one of torch's parallel regions). `run`
// never throws; nothing here allocates.
extern "C" void run_shares_on_torch(void* (*run)(void*), char* work, size_t size,
                                    int64_t shares) {
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) run(work + j * size);
  });
}

// The address of run_shares_on_torch, for cpu_kernel.py to pass to the kernels; None
// where parallel_for would run it serially (built without OpenMP, or a torch whose
// parallel backend is not OpenMP) or might not run it on torch's libgomp: clang (and
// compilers built on it) call libomp's entry points for a parallel region, whatever
// openmp_runtime() reports, so only GCC's calls into libgomp are trusted.
PyObject* share_runner(PyObject*, PyObject*) {
#if defined(_OPENMP) && AT_PARALLEL_OPENMP && defined(__GNUC__) && !defined(__clang__)
  return PyLong_FromVoidPtr(reinterpret_cast<void*>(&run_shares_on_torch));
#else
  Py_RETURN_NONE;
#endif
}

// The file of the OpenMP runtime this module's parallel regions run on, or None.
PyObject* openmp_runtime(PyObject*, PyObject*) {
#ifdef _OPENMP
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) != 0 &&
      info.dli_fname != nullptr)
    return PyUnicode_DecodeFSDefault(info.dli_fname);
#endif
  Py_RETURN_NONE;
}

// Every entry point through this: an error torch throws while a tensor is read (one this
// file did not foresee) becomes a Python RuntimeError. Escaping a C entry point, it ended
// the process.
template <PyObject* (*entry)(PyObject*, PyObject*)>
PyObject* guarded(PyObject* self, PyObject* args) {
  try {
    return entry(self, args);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"share_runner", guarded<share_runner>, METH_NOARGS, nullptr},
    {"openmp_runtime", guarded<openmp_runtime>, METH_NOARGS, nullptr},
    {"set_plain_types", guarded<set_plain_types>, METH_VARARGS, nullptr},
    {"parameter_layout", guarded<parameter_layout>, METH_O, nullptr},
    {"column_addresses", guarded<column_addresses>, METH_VARARGS, nullptr},
    {"gradient_addresses", guarded<gradient_addresses>, METH_VARARGS, nullptr},
    {"first_unbacked", guarded<first_unbacked>, METH_O, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "adamkit_host_checks", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_adamkit_host_checks() { return PyModule_Create(&module); }
