// fastvit._signature: the plan key of an op call, read in C++ (the host fast path of fastvit.ops).
//
// A repeated op call costs one dict lookup keyed on what its validation read: every tensor
// argument's shape, strides, dtype and device. Read from Python, those are ~10-16 attribute
// reads per call, each of which builds a Python object (torch.Size, torch.device): ~2 us of a
// ~5 us F.linear on a small CPU. Here they are copied from the TensorImpl into one bytes object
// (~0.15 us). Nothing is validated here: a different fact gives a different key, and a key seen
// for the first time goes through the op's Python validation.
//
// signature(*args) -> bytes | None. Each argument is None or a tensor whose Python type is exactly
// torch.Tensor or torch.nn.Parameter with strided layout and concrete sizes. Any other argument
// (a subclass such as FakeTensor, a sparse / nested tensor, symbolic sizes, a non-tensor) makes
// the call uncacheable: the result is None and the op validates it every time.
//
// Layout of the bytes, int64 words: per argument, None -> -1; a tensor -> one header word
// (dim | scalar type << 8 | device type << 16 | (device index + 1) << 24) then its sizes then its
// strides. Headers are non-negative and carry dim, so no two different argument lists share bytes.
//
// THPVariable's layout changes between torch versions (at::Tensor or MaybeOwned<at::Tensor>), so
// this file must be compiled against the torch that imports it: TORCH_VERSION records the one it
// was built with and fastvit/signature.py refuses a module built for another.

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

namespace {

constexpr Py_ssize_t kMaxWords = 512;  // 16 tensors of 15 dims: far more than any op passes

PyObject* signature(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  int64_t words[kMaxWords];
  Py_ssize_t n = 0;
  try {
    for (Py_ssize_t i = 0; i < nargs; ++i) {
      PyObject* obj = args[i];
      if (obj == Py_None) {
        if (n >= kMaxWords) Py_RETURN_NONE;
        words[n++] = -1;
        continue;
      }
      if (!THPVariable_CheckExact(obj)) Py_RETURN_NONE;
      const c10::TensorImpl* impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
      if (impl->layout() != c10::kStrided || impl->is_nested() || impl->has_symbolic_sizes_strides())
        Py_RETURN_NONE;
      const int64_t dim = impl->dim();
      if (n + 1 + 2 * dim > kMaxWords) Py_RETURN_NONE;
      const c10::Device device = impl->device();
      words[n++] = dim | (static_cast<int64_t>(impl->dtype().toScalarType()) << 8) |
                   (static_cast<int64_t>(device.type()) << 16) | (static_cast<int64_t>(device.index() + 1) << 24);
      const c10::IntArrayRef sizes = impl->sizes();
      const c10::IntArrayRef strides = impl->strides();
      for (int64_t d = 0; d < dim; ++d) words[n++] = sizes[d];
      for (int64_t d = 0; d < dim; ++d) words[n++] = strides[d];
    }
  } catch (const std::exception&) {  // a TensorImpl with custom sizes: not cacheable, never an error
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words), n * static_cast<Py_ssize_t>(sizeof(int64_t)));
}

PyMethodDef methods[] = {
    {"signature", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(signature)), METH_FASTCALL,
     "signature(*tensors_or_none) -> bytes | None: the plan key of the tensor arguments of an op call."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_signature", "fastvit's op-call signatures in C++.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__signature(void) {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* version = Py_BuildValue("(iii)", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  if (version == nullptr || PyModule_AddObject(m, "TORCH_VERSION", version) < 0) {
    Py_XDECREF(version);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
