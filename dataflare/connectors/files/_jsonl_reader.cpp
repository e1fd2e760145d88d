// Fast path of the `jsonl` source: parse a block of JSON lines with
// simdjson into Arrow column buffers, for schemas of int64, float64,
// boolean and string fields.
//
// The reader only accepts blocks it reads exactly as Arrow's JSON reader
// would: one object per line, no blank lines, every field of the schema
// of its type or null (or absent), no field twice. For anything else it
// returns None and the caller parses the block with Arrow, which also
// names the bad lines. So this reader may be stricter than Arrow, never
// laxer.
//
// The parse runs without the GIL, so blocks parse on several threads.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <simdjson.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kWindow = 256 * 1024;
// A parser keeps memory for the largest window it parsed; after a longer
// line than this it is replaced, so the memory goes back.
constexpr size_t kKeptCapacity = 16 * 1024 * 1024;
// Up to this many fields are looked up by comparing names in turn, which is
// faster than hashing for the few fields most schemas have.
constexpr size_t kLinearFields = 16;

thread_local simdjson::dom::parser parser;

enum Kind : int { INT64 = 0, FLOAT64 = 1, BOOL = 2, STRING = 3 };

struct Column {
  Kind kind;
  std::string name;
  std::vector<uint8_t> valid;  // validity bitmap, filled on the first null
  int64_t nulls = 0;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<uint8_t> bits;  // boolean values as a bitmap
  std::vector<int32_t> offsets;
  std::string text;
};

void set_bit(std::vector<uint8_t>& bitmap, int64_t i, bool value) {
  size_t byte = static_cast<size_t>(i >> 3);
  if (bitmap.size() <= byte) bitmap.resize(byte + 1, 0);
  if (value) bitmap[byte] |= static_cast<uint8_t>(1u << (i & 7));
}

// Append a null at row `row`: mark rows before it valid on the first null.
void append_null(Column& c, int64_t row) {
  if (c.nulls == 0) {
    c.valid.assign(static_cast<size_t>((row >> 3) + 1), 0xff);
  }
  c.nulls++;
  set_bit(c.valid, row, true);  // grows the bitmap to the row
  c.valid[static_cast<size_t>(row >> 3)] &= static_cast<uint8_t>(~(1u << (row & 7)));
  switch (c.kind) {
    case INT64: c.ints.push_back(0); break;
    case FLOAT64: c.floats.push_back(0.0); break;
    case BOOL: set_bit(c.bits, row, false); break;
    case STRING: c.offsets.push_back(static_cast<int32_t>(c.text.size())); break;
  }
}

// Append `value` at row `row`; false if Arrow might read it differently.
bool append(Column& c, int64_t row, simdjson::dom::element value) {
  using simdjson::dom::element_type;
  element_type type = value.type();
  if (type == element_type::NULL_VALUE) {
    append_null(c, row);
    return true;
  }
  if (c.nulls) set_bit(c.valid, row, true);
  switch (c.kind) {
    case INT64:
      if (type != element_type::INT64) return false;
      c.ints.push_back(value.get_int64().value_unsafe());
      return true;
    case FLOAT64:
      if (type == element_type::DOUBLE) {
        c.floats.push_back(value.get_double().value_unsafe());
      } else if (type == element_type::INT64) {
        c.floats.push_back(static_cast<double>(value.get_int64().value_unsafe()));
      } else if (type == element_type::UINT64) {
        c.floats.push_back(static_cast<double>(value.get_uint64().value_unsafe()));
      } else {
        return false;
      }
      return true;
    case BOOL:
      if (type != element_type::BOOL) return false;
      set_bit(c.bits, row, value.get_bool().value_unsafe());
      return true;
    case STRING: {
      if (type != element_type::STRING) return false;
      std::string_view s = value.get_string().value_unsafe();
      c.text.append(s.data(), s.size());
      if (c.text.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
        return false;
      }
      c.offsets.push_back(static_cast<int32_t>(c.text.size()));
      return true;
    }
  }
  return false;
}

// True if the text contains `-0` as a whole number: simdjson reads it as
// the integer 0, while Arrow reads -0.0 into a float field.
bool has_negative_zero(const char* data, size_t size) {
  const char* end = data + size;
  const char* at = data;
  while (at < end) {
    const void* found = memmem(at, static_cast<size_t>(end - at), "-0", 2);
    if (found == nullptr) return false;
    const char* next = static_cast<const char*>(found) + 2;
    if (next >= end) return true;
    char c = *next;
    if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E')) return true;
    at = next;
  }
  return false;
}

// Parse `size` bytes at `data` into `columns`, in windows of `batch`
// bytes; return the row count, or -1 where Arrow must parse the block. A
// line longer than `batch` makes it fail.
int64_t parse(const char* data, size_t size, size_t batch, std::vector<Column>& columns) {
  parser.threaded = false;  // the thread pool already keeps the cores busy
  std::unordered_map<std::string_view, size_t> by_name;
  if (columns.size() > kLinearFields) {
    for (size_t i = 0; i < columns.size(); i++) by_name.emplace(columns[i].name, i);
  }
  auto index_of = [&](std::string_view key) -> size_t {
    if (!by_name.empty()) {
      auto found = by_name.find(key);
      return found == by_name.end() ? columns.size() : found->second;
    }
    for (size_t i = 0; i < columns.size(); i++) {
      if (key == columns[i].name) return i;
    }
    return columns.size();
  };

  simdjson::padded_string padded(data, size);
  simdjson::dom::document_stream stream;
  if (parser.parse_many(padded, batch < size ? batch : size).get(stream)) return -1;

  size_t line_start = 0;
  int64_t row = 0;
  std::vector<int64_t> seen(columns.size(), -1);
  for (auto it = stream.begin(); it != stream.end(); ++it) {
    simdjson::dom::element doc;
    if ((*it).get(doc)) return -1;
    // Each document must start where its line starts: then none spans
    // two lines, no line contains two, and no line is blank.
    size_t start = it.current_index();
    if (start != line_start) return -1;
    const void* newline = memchr(data + start, '\n', size - start);
    line_start = newline ? static_cast<const char*>(newline) - data + 1 : size;
    simdjson::dom::object object;
    if (doc.get_object().get(object)) return -1;
    for (auto field : object) {
      size_t i = index_of(field.key);
      if (i == columns.size()) continue;  // not in the schema
      if (seen[i] == row) return -1;      // a field given twice
      seen[i] = row;
      if (!append(columns[i], row, field.value)) return -1;
    }
    for (size_t i = 0; i < columns.size(); i++) {
      if (seen[i] != row) append_null(columns[i], row);
    }
    row++;
  }
  if (line_start != size || stream.truncated_bytes() != 0) return -1;
  return row;
}

PyObject* bytes_of(const void* data, size_t size) {
  return PyBytes_FromStringAndSize(static_cast<const char*>(data),
                                   static_cast<Py_ssize_t>(size));
}

// One column as (null count, validity or None, values, offsets or None).
PyObject* column_tuple(const Column& c, int64_t rows) {
  size_t bitmap_bytes = static_cast<size_t>((rows + 7) / 8);
  PyObject* valid = Py_None;
  Py_INCREF(Py_None);
  if (c.nulls) {
    std::vector<uint8_t> bitmap = c.valid;
    bitmap.resize(bitmap_bytes, 0);
    Py_DECREF(Py_None);
    valid = bytes_of(bitmap.data(), bitmap.size());
  }
  PyObject* values = nullptr;
  PyObject* offsets = Py_None;
  Py_INCREF(Py_None);
  switch (c.kind) {
    case INT64: values = bytes_of(c.ints.data(), c.ints.size() * sizeof(int64_t)); break;
    case FLOAT64:
      values = bytes_of(c.floats.data(), c.floats.size() * sizeof(double));
      break;
    case BOOL: {
      std::vector<uint8_t> bits = c.bits;
      bits.resize(bitmap_bytes, 0);
      values = bytes_of(bits.data(), bits.size());
      break;
    }
    case STRING:
      values = bytes_of(c.text.data(), c.text.size());
      Py_DECREF(Py_None);
      offsets = bytes_of(c.offsets.data(), c.offsets.size() * sizeof(int32_t));
      break;
  }
  if (valid == nullptr || values == nullptr || offsets == nullptr) {
    Py_XDECREF(valid);
    Py_XDECREF(values);
    Py_XDECREF(offsets);
    return nullptr;
  }
  return Py_BuildValue("(LNNN)", static_cast<long long>(c.nulls), valid, values, offsets);
}

PyObject* read_block(PyObject*, PyObject* args) {
  Py_buffer block;
  PyObject* fields;
  if (!PyArg_ParseTuple(args, "y*O!", &block, &PyTuple_Type, &fields)) return nullptr;
  std::vector<Column> columns;
  Py_ssize_t count = PyTuple_GET_SIZE(fields);
  for (Py_ssize_t i = 0; i < count; i++) {
    const char* name;
    Py_ssize_t name_size;
    int kind;
    PyObject* field = PyTuple_GET_ITEM(fields, i);
    if (!PyArg_ParseTuple(field, "s#i", &name, &name_size, &kind) || kind < INT64 ||
        kind > STRING) {
      PyBuffer_Release(&block);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "unknown field kind");
      return nullptr;
    }
    Column column;
    column.kind = static_cast<Kind>(kind);
    column.name.assign(name, static_cast<size_t>(name_size));
    if (column.kind == STRING) column.offsets.push_back(0);
    columns.push_back(std::move(column));
  }

  int64_t rows = -1;
  const char* data = static_cast<const char*>(block.buf);
  size_t size = static_cast<size_t>(block.len);
  bool has_float = false;
  for (const Column& c : columns) has_float |= c.kind == FLOAT64;
  Py_BEGIN_ALLOW_THREADS
  try {
    if (!(has_float && has_negative_zero(data, size))) {
      std::vector<Column> empty = columns;
      // Windows of 256 KiB parse faster than whole blocks (they stay in
      // the cache) and keep the parser small; a longer line needs one.
      rows = parse(data, size, kWindow, columns);
      if (rows < 0 && size > kWindow) {
        columns = std::move(empty);
        rows = parse(data, size, size, columns);
      }
    }
  } catch (...) {  // out of memory: Arrow's reader then reports the error
    rows = -1;
  }
  if (parser.capacity() > kKeptCapacity) parser = simdjson::dom::parser{};
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&block);
  if (rows < 0) Py_RETURN_NONE;
  PyObject* result = PyList_New(count);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; i++) {
    PyObject* column = column_tuple(columns[static_cast<size_t>(i)], rows);
    if (column == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, i, column);
  }
  return Py_BuildValue("(LN)", static_cast<long long>(rows), result);
}

PyMethodDef methods[] = {
    {"read_block", read_block, METH_VARARGS,
     "read_block(block, fields) -> (rows, columns) or None\n\n"
     "fields: (name, kind) pairs, kind 0 int64, 1 float64, 2 bool, 3 string.\n"
     "Each column is (null count, validity or None, values, offsets or None)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonl_reader",
                      "Fast JSON lines reader (simdjson)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__jsonl_reader(void) { return PyModule_Create(&module); }
