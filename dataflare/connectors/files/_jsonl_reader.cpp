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

#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <thread>
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

// A field name seen at one position of an object, and its column (the
// column count when the schema lacks it).
struct NameAt {
  std::string name;
  size_t column;
};

// Parse `size` bytes at `data` into `columns`, in windows of `batch`
// bytes; return the row count, or -1 where Arrow must parse the block. A
// line longer than `batch` makes it fail. The SIMDJSON_PADDING bytes
// after the text must be allocated (simdjson may read them).
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
  // Lines of one file mostly list their fields in the same order, so the
  // name at each position of the last object is checked first.
  std::vector<NameAt> last_names;
  auto column_at = [&](size_t position, std::string_view key) -> size_t {
    if (position < last_names.size()) {
      NameAt& last = last_names[position];
      if (key == last.name) return last.column;
      last.name.assign(key.data(), key.size());
      last.column = index_of(key);
      return last.column;
    }
    last_names.push_back(NameAt{std::string(key), index_of(key)});
    return last_names.back().column;
  };

  simdjson::dom::document_stream stream;
  if (parser.parse_many(data, size, batch < size ? batch : size).get(stream)) return -1;

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
    size_t position = 0;
    for (auto field : object) {
      size_t i = column_at(position++, field.key);
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

// Columns for the (name, kind) pairs of `fields`; false with a Python
// error set if a pair is not one.
bool make_columns(PyObject* fields, std::vector<Column>& columns) {
  Py_ssize_t count = PyTuple_GET_SIZE(fields);
  for (Py_ssize_t i = 0; i < count; i++) {
    const char* name;
    Py_ssize_t name_size;
    int kind;
    PyObject* field = PyTuple_GET_ITEM(fields, i);
    if (!PyArg_ParseTuple(field, "s#i", &name, &name_size, &kind) || kind < INT64 ||
        kind > STRING) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "unknown field kind");
      return false;
    }
    Column column;
    column.kind = static_cast<Kind>(kind);
    column.name.assign(name, static_cast<size_t>(name_size));
    if (column.kind == STRING) column.offsets.push_back(0);
    columns.push_back(std::move(column));
  }
  return true;
}

// Parse a block into `columns` (empty ones on entry); return the row
// count, or -1 where Arrow must parse the block. `padded`: the
// SIMDJSON_PADDING bytes after the block are allocated, so simdjson reads
// the block where it is instead of a padded copy. Runs without the GIL.
int64_t parse_block(const char* data, size_t size, bool padded,
                    std::vector<Column>& columns) {
  int64_t rows = -1;
  bool has_float = false;
  for (const Column& c : columns) has_float |= c.kind == FLOAT64;
  try {
    if (!(has_float && has_negative_zero(data, size))) {
      simdjson::padded_string copy;
      if (!padded) {
        copy = simdjson::padded_string(data, size);
        data = copy.data();
      }
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
  return rows;
}

// Return (rows, [column tuples]) for parsed columns.
PyObject* columns_result(const std::vector<Column>& columns, int64_t rows) {
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(columns.size()));
  if (result == nullptr) return nullptr;
  for (size_t i = 0; i < columns.size(); i++) {
    PyObject* column = column_tuple(columns[i], rows);
    if (column == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), column);
  }
  return Py_BuildValue("(LN)", static_cast<long long>(rows), result);
}

// True if `object` is a bytearray with at least SIMDJSON_PADDING bytes
// allocated after its contents.
bool has_padding(PyObject* object) {
  if (!PyByteArray_CheckExact(object)) return false;
  auto* array = reinterpret_cast<PyByteArrayObject*>(object);
  Py_ssize_t used = (array->ob_start - array->ob_bytes) + Py_SIZE(object);
  return array->ob_alloc - used >= static_cast<Py_ssize_t>(simdjson::SIMDJSON_PADDING);
}

PyObject* read_block(PyObject*, PyObject* args) {
  PyObject* object;
  PyObject* fields;
  if (!PyArg_ParseTuple(args, "OO!", &object, &PyTuple_Type, &fields)) return nullptr;
  Py_buffer block;
  if (PyObject_GetBuffer(object, &block, PyBUF_SIMPLE) < 0) return nullptr;
  // The buffer export keeps a bytearray from being resized meanwhile.
  bool padded = has_padding(object);
  std::vector<Column> columns;
  if (!make_columns(fields, columns)) {
    PyBuffer_Release(&block);
    return nullptr;
  }
  int64_t rows;
  Py_BEGIN_ALLOW_THREADS
  rows = parse_block(static_cast<const char*>(block.buf), static_cast<size_t>(block.len),
                     padded, columns);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&block);
  if (rows < 0) Py_RETURN_NONE;
  return columns_result(columns, rows);
}

// --- Head start: read and parse the start of a file on a thread of its
// own, without the GIL, while the interpreter goes on loading modules.

// One block read by a head start: parsed columns, or its text when the
// block is left to the caller (rows < 0).
struct Piece {
  size_t size = 0;
  int64_t rows = -1;
  std::vector<Column> columns;
  std::string text;
};

// Shrink the vectors of `columns` to their contents, and return the bytes
// they then take.
size_t shrink_and_count(std::vector<Column>& columns) {
  size_t total = 0;
  for (Column& c : columns) {
    c.valid.shrink_to_fit();
    c.ints.shrink_to_fit();
    c.floats.shrink_to_fit();
    c.bits.shrink_to_fit();
    c.offsets.shrink_to_fit();
    c.text.shrink_to_fit();
    total += c.valid.capacity() + c.ints.capacity() * sizeof(int64_t) +
             c.floats.capacity() * sizeof(double) + c.bits.capacity() +
             c.offsets.capacity() * sizeof(int32_t) + c.text.capacity();
  }
  return total;
}

struct HeadStartState {
  std::string path;
  std::vector<Column> columns;  // empty columns of the fields
  size_t block_size = 0;
  size_t limit = 0;
  std::atomic<bool> stop{false};
  // Written by the thread only; read after it was joined.
  std::vector<Piece> pieces;
  size_t handed_out = 0;  // pieces that take() returned
  size_t stored = 0;  // bytes of the pieces held for take()
  size_t skipped = 0;  // a byte order mark
  std::string rest;    // bytes read after the last block's last newline
  int error = 0;
  bool opened = false;
  unsigned long long device = 0, inode = 0;
  long long mtime_ns = 0, file_size = 0;

  void run() {
    // O_NONBLOCK: opening a FIFO must not wait for a writer. Only regular
    // files are read; reading a FIFO or a device would take its data.
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      error = errno;
      return;
    }
    struct stat status;
    if (fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
      error = EINVAL;
      close(fd);
      return;
    }
    opened = true;
    device = static_cast<unsigned long long>(status.st_dev);
    inode = static_cast<unsigned long long>(status.st_ino);
    mtime_ns = static_cast<long long>(status.st_mtim.tv_sec) * 1000000000LL +
               status.st_mtim.tv_nsec;
    file_size = static_cast<long long>(status.st_size);
    try {
      read_all(fd);
    } catch (...) {  // out of memory: the caller reads the file itself
      error = ENOMEM;
    }
    close(fd);
    parser = simdjson::dom::parser{};
  }

  // Read up to `size` bytes from `fd` into `buffer`. Returns the bytes read,
  // which are fewer only at the end of the file, or -1 on an error.
  ssize_t fill(int fd, char* buffer, size_t size) {
    size_t done = 0;
    while (done < size) {
      ssize_t got = read(fd, buffer + done, size - done);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        error = errno;
        return -1;
      }
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    return static_cast<ssize_t>(done);
  }

  void read_all(int fd) {
    char mark[3];
    ssize_t got = fill(fd, mark, sizeof mark);
    if (got < 0) return;
    if (got == 3 && std::memcmp(mark, "\xEF\xBB\xBF", 3) == 0) {
      skipped = 3;
    } else if (lseek(fd, 0, SEEK_SET) != 0) {
      error = errno;
      return;
    }
    // Blocks are cut as the source's reader cuts them: the bytes after a
    // block's last newline, then `block_size` bytes read after them.
    while (!stop.load(std::memory_order_relaxed) && stored < limit) {
      std::string text = std::move(rest);
      rest.clear();
      size_t carried = text.size();
      // The padding lets simdjson parse the block where it is.
      text.reserve(carried + block_size + simdjson::SIMDJSON_PADDING);
      text.resize(carried + block_size);
      got = fill(fd, &text[carried], block_size);
      if (got < 0) return;
      text.resize(carried + static_cast<size_t>(got));
      if (got == 0) {
        if (!text.empty()) add(std::move(text));  // a last line with no newline
        return;
      }
      size_t end = text.rfind('\n');
      if (end == std::string::npos) {
        rest = std::move(text);  // one line longer than the block size
        if (rest.size() > limit) return;  // too long to hold here
        continue;
      }
      rest.assign(text, end + 1, std::string::npos);
      text.resize(end + 1);
      add(std::move(text));
    }
  }

  void add(std::string text) {
    Piece piece;
    piece.size = text.size();
    piece.columns = columns;
    bool padded = text.capacity() - text.size() >= simdjson::SIMDJSON_PADDING;
    piece.rows = parse_block(text.data(), text.size(), padded, piece.columns);
    if (piece.rows < 0) {
      piece.columns.clear();
      piece.text = std::move(text);
      piece.text.shrink_to_fit();
      stored += piece.text.capacity();
    } else {
      stored += shrink_and_count(piece.columns);
    }
    pieces.push_back(std::move(piece));
  }
};

struct HeadStartObject {
  PyObject_HEAD
  HeadStartState* state;
  std::thread* thread;
};

void head_start_join(HeadStartObject* self, bool stop = true) {
  if (self->thread == nullptr) return;
  if (stop) self->state->stop.store(true);
  std::thread* thread = self->thread;
  Py_BEGIN_ALLOW_THREADS
  thread->join();
  Py_END_ALLOW_THREADS
  delete thread;
  self->thread = nullptr;
}

int head_start_init(PyObject* object, PyObject* args, PyObject* kwargs) {
  auto* self = reinterpret_cast<HeadStartObject*>(object);
  static const char* names[] = {"path", "fields", "block_size", "limit", nullptr};
  const char* path;
  PyObject* fields;
  Py_ssize_t block_size;
  Py_ssize_t limit;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sO!nn", const_cast<char**>(names),
                                   &path, &PyTuple_Type, &fields, &block_size, &limit)) {
    return -1;
  }

  if (self->state != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "a head start runs only once");
    return -1;
  }
  if (block_size <= 0 || limit < 0) {
    PyErr_SetString(PyExc_ValueError,
                    "invalid block_size or limit: block_size must be positive and "
                    "limit at least 0");
    return -1;
  }

  auto* state = new HeadStartState();
  if (!make_columns(fields, state->columns)) {
    delete state;
    return -1;
  }
  state->path = path;
  state->block_size = static_cast<size_t>(block_size);
  state->limit = static_cast<size_t>(limit);
  self->state = state;

  try {
    self->thread = new std::thread([state] { state->run(); });
  } catch (...) {
    self->thread = nullptr;
    state->error = EAGAIN;
  }
  return 0;
}

void head_start_dealloc(PyObject* object) {
  auto* self = reinterpret_cast<HeadStartObject*>(object);
  head_start_join(self);
  delete self->state;
  Py_TYPE(object)->tp_free(object);
}

HeadStartState* started(PyObject* object) {
  auto* self = reinterpret_cast<HeadStartObject*>(object);
  if (self->state == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the head start was not started");
  }
  return self->state;
}

PyObject* head_start_finish(PyObject* object, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"wait", nullptr};
  int wait = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$p", const_cast<char**>(names), &wait)) {
    return nullptr;
  }
  HeadStartState* state = started(object);
  if (state == nullptr) return nullptr;
  head_start_join(reinterpret_cast<HeadStartObject*>(object), !wait);

  PyObject* sizes = PyList_New(static_cast<Py_ssize_t>(state->pieces.size()));
  if (sizes == nullptr) return nullptr;
  for (size_t i = 0; i < state->pieces.size(); i++) {
    PyObject* size = PyLong_FromSize_t(state->pieces[i].size);
    if (size == nullptr) {
      Py_DECREF(sizes);
      return nullptr;
    }
    PyList_SET_ITEM(sizes, static_cast<Py_ssize_t>(i), size);
  }

  PyObject* identity = Py_None;
  Py_INCREF(Py_None);
  if (state->opened) {
    Py_DECREF(Py_None);
    identity = Py_BuildValue("(KKLL)", state->device, state->inode, state->mtime_ns,
                             state->file_size);
    if (identity == nullptr) {
      Py_DECREF(sizes);
      return nullptr;
    }
  }

  PyObject* rest = bytes_of(state->rest.data(), state->rest.size());
  if (rest == nullptr) {
    Py_DECREF(sizes);
    Py_DECREF(identity);
    return nullptr;
  }
  return Py_BuildValue("{sNsnsNsisN}", "sizes", sizes, "skipped",
                       static_cast<Py_ssize_t>(state->skipped), "rest", rest, "error",
                       state->error, "identity", identity);
}

PyObject* head_start_take(PyObject* object, PyObject*) {
  HeadStartState* state = started(object);
  if (state == nullptr) return nullptr;
  auto* self = reinterpret_cast<HeadStartObject*>(object);
  if (self->thread != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "call finish() before take()");
    return nullptr;
  }
  if (state->handed_out == state->pieces.size()) Py_RETURN_NONE;
  Piece piece = std::move(state->pieces[state->handed_out++]);
#ifdef __GLIBC__
  // The blocks returned before were copied into Python objects on this thread
  // and are freed by now. glibc keeps freed memory in its arenas; give it
  // back, or it would add to the memory of the rest of the run.
  if (state->handed_out == state->pieces.size()) malloc_trim(0);
#endif
  if (piece.rows < 0) {
    return Py_BuildValue("(Oy#)", Py_None, piece.text.data(),
                         static_cast<Py_ssize_t>(piece.text.size()));
  }
  PyObject* parsed = columns_result(piece.columns, piece.rows);
  return parsed == nullptr ? nullptr : Py_BuildValue("(NO)", parsed, Py_None);
}

PyMethodDef head_start_methods[] = {
    {"finish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(head_start_finish)),
     METH_VARARGS | METH_KEYWORDS,
     "finish(*, wait=False) -> dict\n\n"
     "Stop reading after the block being parsed (with wait, once the limit\n"
     "or the end of the file is reached), and say what was read:\n"
     "sizes, the bytes of input of each block; skipped, the bytes of a byte\n"
     "order mark before them; rest, the bytes read after the last block (the\n"
     "start of the next, which continues with block_size more); error, an\n"
     "errno or 0 (EINVAL: not a regular file); identity, (device, inode,\n"
     "modification time in ns, size) of the file when it was opened, or None."},
    {"take", head_start_take, METH_NOARGS,
     "take() -> ((rows, columns) or None, text or None) or None\n\n"
     "After finish(): the next block, as read_block parsed it, or its text\n"
     "where read_block would return None; None after the last block. Each\n"
     "block's memory is freed when take() returns it."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject HeadStartType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyMethodDef methods[] = {
    {"read_block", read_block, METH_VARARGS,
     "read_block(block, fields) -> (rows, columns) or None\n\n"
     "fields: (name, kind) pairs, kind 0 int64, 1 float64, 2 bool, 3 string.\n"
     "Each column is (null count, validity or None, values, offsets or None)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonl_reader",
                      "Fast JSON lines reader (simdjson)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__jsonl_reader(void) {
  HeadStartType.tp_name = "dataflare.connectors.files._jsonl_reader.HeadStart";
  HeadStartType.tp_basicsize = sizeof(HeadStartObject);
  HeadStartType.tp_flags = Py_TPFLAGS_DEFAULT;
  HeadStartType.tp_doc =
      "HeadStart(path, fields, block_size, limit)\n\n"
      "Read `path` from its start in blocks of `block_size` bytes that end on\n"
      "a newline, and parse each as read_block does, on a thread without the\n"
      "GIL, until about `limit` bytes of columns are stored or finish() is called.";
  HeadStartType.tp_new = PyType_GenericNew;
  HeadStartType.tp_init = head_start_init;
  HeadStartType.tp_dealloc = head_start_dealloc;
  HeadStartType.tp_methods = head_start_methods;
  if (PyType_Ready(&HeadStartType) < 0) return nullptr;
  PyObject* created = PyModule_Create(&module);
  if (created == nullptr) return nullptr;
  Py_INCREF(&HeadStartType);
  if (PyModule_AddObject(created, "HeadStart", reinterpret_cast<PyObject*>(&HeadStartType)) < 0) {
    Py_DECREF(&HeadStartType);
    Py_DECREF(created);
    return nullptr;
  }
  return created;
}
