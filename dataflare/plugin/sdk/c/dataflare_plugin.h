/*
 * dataflare_plugin.h - write DataFlare WebAssembly plugins in C.
 *
 * One header, no library to link. It declares the Extism kernel functions a
 * plugin needs (import module "extism:host/env") and helpers for the v1
 * batch encoding (docs/plugin-batch-encoding.md):
 *
 *   df_batch_input()      read the call's input batch
 *   df_batch_column()     find a column by name; df_is_null, df_get_i64,
 *                         df_get_f64, df_get_number, df_get_bool, df_get_str
 *   df_output_selection() set a filter call's output (a selection vector)
 *   df_writer_*           build and output a batch (maps, flat-maps)
 *   df_config()           read a value of the plugin's config
 *   df_fail()             report that the whole batch failed
 *
 * Build (Zig's C compiler, from `pip install ziglang`):
 *
 *   python -m ziglang cc --target=wasm32-wasi -O2 -mexec-model=reactor \
 *       -Wl,-z,stack-size=1048576 -Wl,--strip-debug \
 *       -I path/to/sdk/c -o plugin.wasm plugin.c
 *
 * `dataflare plugin build` runs exactly that. A plugin function is exported
 * with DF_EXPORT("name"), takes nothing and returns 0 on success:
 *
 *   DF_EXPORT("keep_late") int32_t keep_late(void) {
 *       df_batch batch;
 *       if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
 *       ...
 *   }
 *
 * Everything here is `static`, so functions a plugin does not call cost
 * nothing, and kernel functions it does not call are not imported.
 */
#ifndef DATAFLARE_PLUGIN_H
#define DATAFLARE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- Extism kernel ----------------------------------------------------- */

/* Every kernel function lives in the import module "extism:host/env". A
 * kernel pointer (uint64_t) is an offset into Extism's own memory, which the
 * plugin reaches only through these functions. */
#define DF_KERNEL(name) \
    __attribute__((import_module("extism:host/env"), import_name(#name)))

DF_KERNEL(input_length) uint64_t extism_input_length(void);
DF_KERNEL(input_load_u8) uint32_t extism_input_load_u8(uint64_t offset);
DF_KERNEL(input_load_u64) uint64_t extism_input_load_u64(uint64_t offset);
DF_KERNEL(alloc) uint64_t extism_alloc(uint64_t length);
DF_KERNEL(free) void extism_free(uint64_t pointer);
DF_KERNEL(length) uint64_t extism_length(uint64_t pointer);
DF_KERNEL(load_u8) uint32_t extism_load_u8(uint64_t pointer);
DF_KERNEL(load_u64) uint64_t extism_load_u64(uint64_t pointer);
DF_KERNEL(store_u8) void extism_store_u8(uint64_t pointer, uint32_t value);
DF_KERNEL(store_u64) void extism_store_u64(uint64_t pointer, uint64_t value);
DF_KERNEL(output_set) void extism_output_set(uint64_t pointer, uint64_t length);
DF_KERNEL(error_set) void extism_error_set(uint64_t pointer);
DF_KERNEL(config_get) uint64_t extism_config_get(uint64_t key_pointer);
DF_KERNEL(var_get) uint64_t extism_var_get(uint64_t key_pointer);
DF_KERNEL(var_set) void extism_var_set(uint64_t key_pointer, uint64_t value_pointer);
DF_KERNEL(log_info) void extism_log_info(uint64_t pointer);
DF_KERNEL(log_warn) void extism_log_warn(uint64_t pointer);
DF_KERNEL(log_error) void extism_log_error(uint64_t pointer);

/* Export a plugin function under `name`. */
#define DF_EXPORT(name) __attribute__((export_name(name)))

/* ---- moving bytes between plugin memory and the kernel ----------------- */

/* Copy `length` bytes at kernel pointer `source` into `dest`. */
static void df_kernel_load(uint64_t source, void *dest, size_t length) {
    uint8_t *out = (uint8_t *)dest;
    size_t i = 0;
    for (; i + 8 <= length; i += 8) {
        uint64_t word = extism_load_u64(source + i);
        memcpy(out + i, &word, 8);
    }
    for (; i < length; i++) out[i] = (uint8_t)extism_load_u8(source + i);
}

/* Copy bytes into a new kernel block; return its pointer (0 if none). */
static uint64_t df_kernel_store(const void *data, size_t length) {
    const uint8_t *in = (const uint8_t *)data;
    uint64_t pointer = extism_alloc(length);
    if (pointer == 0) return 0;
    size_t i = 0;
    for (; i + 8 <= length; i += 8) {
        uint64_t word;
        memcpy(&word, in + i, 8);
        extism_store_u64(pointer + i, word);
    }
    for (; i < length; i++) extism_store_u8(pointer + i, in[i]);
    return pointer;
}

/* Copy the call's input into plugin memory, 8-byte aligned. The caller
 * frees it with free(). Returns NULL when memory runs out. */
static uint8_t *df_input(size_t *length) {
    size_t n = (size_t)extism_input_length();
    uint8_t *buffer = (uint8_t *)aligned_alloc(8, (n + 7) & ~(size_t)7);
    if (buffer == NULL && n > 0) return NULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word = extism_input_load_u64(i);
        memcpy(buffer + i, &word, 8);
    }
    for (; i < n; i++) buffer[i] = (uint8_t)extism_input_load_u8(i);
    *length = n;
    return buffer;
}

/* Set the call's output. Returns 0, or 1 when the kernel has no memory. */
static int32_t df_output(const void *data, size_t length) {
    uint64_t pointer = df_kernel_store(data, length);
    if (pointer == 0 && length > 0) return 1;
    extism_output_set(pointer, length);
    return 0;
}

/* Report that the batch failed with `message`; returns 1, the status to
 * return from the plugin function: `return df_fail("...");`. The host
 * rejects every record of the batch with this message. */
static int32_t df_fail(const char *message) {
    extism_error_set(df_kernel_store(message, strlen(message)));
    return 1;
}

static void df_log_info(const char *message) {
    extism_log_info(df_kernel_store(message, strlen(message)));
}

static void df_log_warn(const char *message) {
    extism_log_warn(df_kernel_store(message, strlen(message)));
}

/* Return the plugin config value for `key` as a NUL-terminated string to
 * free() (strings come as they are, other values as JSON text), or NULL
 * when the key is not set. */
static char *df_config(const char *key) {
    uint64_t key_pointer = df_kernel_store(key, strlen(key));
    uint64_t value = extism_config_get(key_pointer);
    extism_free(key_pointer);
    if (value == 0) return NULL;
    size_t length = (size_t)extism_length(value);
    char *out = (char *)malloc(length + 1);
    if (out == NULL) return NULL;
    df_kernel_load(value, out, length);
    out[length] = '\0';
    extism_free(value);
    return out;
}

/* Read config `key` as a number into *out. Returns 1 if set and numeric,
 * 0 if not set (*out unchanged), -1 if set but not a number. */
static int df_config_number(const char *key, double *out) {
    char *text = df_config(key);
    if (text == NULL) return 0;
    char *end = NULL;
    double value = strtod(text, &end);
    int ok = end != text && *end == '\0';
    free(text);
    if (!ok) return -1;
    *out = value;
    return 1;
}

/* ---- reading a batch --------------------------------------------------- */

enum {
    DF_INT64 = 1,
    DF_FLOAT64 = 2,
    DF_BOOL = 3,
    DF_UTF8 = 4,
    DF_TIMESTAMP = 5, /* int64 microseconds since the epoch, UTC */
};

typedef struct {
    const char *name;        /* not NUL-terminated: use name_length */
    uint32_t name_length;
    uint8_t type;            /* DF_INT64 ... DF_TIMESTAMP */
    const uint8_t *validity; /* bit i set = value i present; NULL = no nulls */
    const void *values;      /* int64_t, double or uint8_t (bool) values */
    const uint32_t *offsets; /* utf8: rows + 1 offsets into bytes */
    const uint8_t *bytes;    /* utf8: the text */
} df_column;

typedef struct {
    uint32_t rows;
    uint32_t column_count;
    df_column *columns;
    uint8_t *buffer; /* the input, owned by the batch */
} df_batch;

static const char *df_error_text = "";

/* The reason the last df_batch_* function failed. */
static const char *df_last_error(void) { return df_error_text; }

static uint32_t df_read_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint16_t df_read_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static size_t df_pad8(size_t n) { return (n + 7) & ~(size_t)7; }

/* Parse a DFB1 batch held in `buffer` (8-byte aligned). The batch keeps
 * pointers into the buffer. Returns 0, or -1 with df_last_error() set. */
static int df_batch_parse(const uint8_t *buffer, size_t length, df_batch *batch) {
    batch->columns = NULL;
    batch->buffer = NULL;
    if (length < 16 || memcmp(buffer, "DFB1", 4) != 0) {
        df_error_text = "input is not a DFB1 batch";
        return -1;
    }
    if (df_read_u16(buffer + 4) != 1) {
        df_error_text = "input batch has an unknown version";
        return -1;
    }
    batch->rows = df_read_u32(buffer + 8);
    batch->column_count = df_read_u32(buffer + 12);
    if (batch->column_count > length / 12) {
        df_error_text = "input batch declares more columns than it holds";
        return -1;
    }
    batch->columns = (df_column *)calloc(batch->column_count + 1, sizeof(df_column));
    if (batch->columns == NULL) {
        df_error_text = "out of memory reading the batch";
        return -1;
    }
    size_t cursor = 16;
    size_t rows = batch->rows;
    for (uint32_t c = 0; c < batch->column_count; c++) {
        df_column *col = &batch->columns[c];
        if (cursor + 12 > length) goto truncated;
        col->type = buffer[cursor];
        int has_validity = buffer[cursor + 1];
        col->name_length = df_read_u16(buffer + cursor + 2);
        size_t start = df_read_u32(buffer + cursor + 4);
        size_t size = df_read_u32(buffer + cursor + 8);
        col->name = (const char *)buffer + cursor + 12;
        cursor += 12 + col->name_length;
        if (cursor > length || start + size > length || start % 8) goto truncated;
        size_t at = start, end = start + size;
        if (has_validity) {
            col->validity = buffer + at;
            at += df_pad8((rows + 7) / 8);
        }
        switch (col->type) {
        case DF_INT64:
        case DF_FLOAT64:
        case DF_TIMESTAMP:
            if (at + 8 * rows > end) goto truncated;
            col->values = buffer + at;
            break;
        case DF_BOOL:
            if (at + rows > end) goto truncated;
            col->values = buffer + at;
            break;
        case DF_UTF8:
            if (at + 4 * (rows + 1) > end) goto truncated;
            col->offsets = (const uint32_t *)(buffer + at);
            at = df_pad8(at + 4 * (rows + 1));
            if (at + col->offsets[rows] > end) goto truncated;
            col->bytes = buffer + at;
            break;
        default:
            df_error_text = "input batch has a column of unknown type";
            free(batch->columns);
            batch->columns = NULL;
            return -1;
        }
    }
    return 0;
truncated:
    df_error_text = "input batch is truncated";
    free(batch->columns);
    batch->columns = NULL;
    return -1;
}

/* Read the call's input batch. Release it with df_batch_release(). Returns
 * 0, or -1 with df_last_error() set. */
static int df_batch_input(df_batch *batch) {
    size_t length = 0;
    uint8_t *buffer = df_input(&length);
    if (buffer == NULL) {
        df_error_text = "out of memory copying the input";
        return -1;
    }
    if (df_batch_parse(buffer, length, batch) != 0) {
        free(buffer);
        return -1;
    }
    batch->buffer = buffer;
    return 0;
}

static void df_batch_release(df_batch *batch) {
    free(batch->columns);
    free(batch->buffer);
    batch->columns = NULL;
    batch->buffer = NULL;
}

/* Find a column by name; NULL when the batch has none of that name. */
static const df_column *df_batch_column(const df_batch *batch, const char *name) {
    size_t length = strlen(name);
    for (uint32_t c = 0; c < batch->column_count; c++) {
        const df_column *col = &batch->columns[c];
        if (col->name_length == length && memcmp(col->name, name, length) == 0)
            return col;
    }
    return NULL;
}

static inline int df_is_null(const df_column *col, uint32_t row) {
    return col->validity != NULL && !((col->validity[row >> 3] >> (row & 7)) & 1);
}

static inline int64_t df_get_i64(const df_column *col, uint32_t row) {
    int64_t v;
    memcpy(&v, (const uint8_t *)col->values + 8 * (size_t)row, 8);
    return v;
}

static inline double df_get_f64(const df_column *col, uint32_t row) {
    double v;
    memcpy(&v, (const uint8_t *)col->values + 8 * (size_t)row, 8);
    return v;
}

/* The value of an int64, timestamp or float64 column as a double. */
static inline double df_get_number(const df_column *col, uint32_t row) {
    return col->type == DF_FLOAT64 ? df_get_f64(col, row) : (double)df_get_i64(col, row);
}

static inline int df_get_bool(const df_column *col, uint32_t row) {
    return ((const uint8_t *)col->values)[row] != 0;
}

/* The text of a utf8 value (not NUL-terminated) and its length in bytes. */
static inline const char *df_get_str(const df_column *col, uint32_t row, uint32_t *length) {
    uint32_t start = col->offsets[row];
    *length = col->offsets[row + 1] - start;
    return (const char *)col->bytes + start;
}

/* ---- bitmaps ----------------------------------------------------------- */

/* A zeroed bitmap for `rows` bits, to free(). */
static uint8_t *df_bitmap_new(uint32_t rows) {
    return (uint8_t *)calloc(((size_t)rows + 7) / 8 + 8, 1);
}

static inline void df_bitmap_set(uint8_t *bits, uint32_t row) {
    bits[row >> 3] |= (uint8_t)(1u << (row & 7));
}

/* ---- the output of a filter -------------------------------------------- */

/* Output a DFS1 selection vector: bit i of `bits` set keeps row i. */
static int32_t df_output_selection(const uint8_t *bits, uint32_t rows) {
    size_t bytes = ((size_t)rows + 7) / 8;
    uint8_t header[8] = {'D', 'F', 'S', '1', 0, 0, 0, 0};
    memcpy(header + 4, &rows, 4);
    uint64_t pointer = extism_alloc(8 + bytes);
    if (pointer == 0) return df_fail("out of kernel memory for the output");
    uint64_t word;
    memcpy(&word, header, 8);
    extism_store_u64(pointer, word);
    size_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
        memcpy(&word, bits + i, 8);
        extism_store_u64(pointer + 8 + i, word);
    }
    for (; i < bytes; i++) extism_store_u8(pointer + 8 + i, bits[i]);
    extism_output_set(pointer, 8 + bytes);
    return 0;
}

/* ---- writing a batch --------------------------------------------------- */

/* A utf8 column under construction: append values in row order. */
typedef struct {
    uint32_t rows;
    uint32_t capacity;
    uint32_t *offsets;
    uint8_t *validity; /* allocated on the first null */
    uint8_t *bytes;
    size_t byte_count;
    size_t byte_capacity;
    int failed;
} df_utf8_builder;

static void df_utf8_init(df_utf8_builder *b, uint32_t expected_rows) {
    memset(b, 0, sizeof *b);
    b->capacity = expected_rows ? expected_rows : 8;
    b->offsets = (uint32_t *)malloc(((size_t)b->capacity + 1) * 4);
    b->byte_capacity = (size_t)b->capacity * 8 + 8;
    b->bytes = (uint8_t *)malloc(b->byte_capacity);
    if (b->offsets == NULL || b->bytes == NULL) b->failed = 1;
    else b->offsets[0] = 0;
}

static int df_utf8_grow_rows(df_utf8_builder *b) {
    if (b->rows < b->capacity) return 1;
    uint32_t capacity = b->capacity * 2;
    uint32_t *offsets = (uint32_t *)realloc(b->offsets, ((size_t)capacity + 1) * 4);
    if (offsets == NULL) return b->failed = 1, 0;
    b->offsets = offsets;
    if (b->validity != NULL) {
        uint8_t *validity = (uint8_t *)realloc(b->validity, ((size_t)capacity + 7) / 8 + 8);
        if (validity == NULL) return b->failed = 1, 0;
        memset(validity + (b->capacity + 7) / 8 + 8, 0,
               ((size_t)capacity + 7) / 8 - (b->capacity + 7) / 8);
        b->validity = validity;
    }
    b->capacity = capacity;
    return 1;
}

/* Append a value of `length` bytes (valid UTF-8). */
static void df_utf8_append(df_utf8_builder *b, const char *text, size_t length) {
    if (b->failed || !df_utf8_grow_rows(b)) return;
    if (b->byte_count + length > b->byte_capacity) {
        size_t capacity = b->byte_capacity * 2;
        while (capacity < b->byte_count + length) capacity *= 2;
        uint8_t *bytes = (uint8_t *)realloc(b->bytes, capacity);
        if (bytes == NULL) {
            b->failed = 1;
            return;
        }
        b->bytes = bytes;
        b->byte_capacity = capacity;
    }
    memcpy(b->bytes + b->byte_count, text, length);
    b->byte_count += length;
    if (b->validity != NULL) df_bitmap_set(b->validity, b->rows);
    b->rows++;
    b->offsets[b->rows] = (uint32_t)b->byte_count;
}

static void df_utf8_append_cstr(df_utf8_builder *b, const char *text) {
    df_utf8_append(b, text, strlen(text));
}

static void df_utf8_append_null(df_utf8_builder *b) {
    if (b->failed || !df_utf8_grow_rows(b)) return;
    if (b->validity == NULL) {
        b->validity = (uint8_t *)calloc(((size_t)b->capacity + 7) / 8 + 8, 1);
        if (b->validity == NULL) {
            b->failed = 1;
            return;
        }
        for (uint32_t i = 0; i < b->rows; i++) df_bitmap_set(b->validity, i);
    }
    b->rows++;
    b->offsets[b->rows] = (uint32_t)b->byte_count;
}

static void df_utf8_release(df_utf8_builder *b) {
    free(b->offsets);
    free(b->validity);
    free(b->bytes);
    memset(b, 0, sizeof *b);
}

#ifndef DF_MAX_OUTPUT_COLUMNS
#define DF_MAX_OUTPUT_COLUMNS 64
#endif

typedef struct {
    const char *name;
    uint8_t type;
    const uint8_t *validity;
    const void *values;      /* fixed-width types */
    const uint32_t *offsets; /* utf8 */
    const uint8_t *bytes;    /* utf8 */
} df_output_column;

/* An output batch: add columns (their memory must stay valid until
 * df_writer_output), then output it. */
typedef struct {
    uint32_t rows;
    uint32_t column_count;
    int failed;
    df_output_column columns[DF_MAX_OUTPUT_COLUMNS];
} df_writer;

static void df_writer_init(df_writer *w, uint32_t rows) {
    w->rows = rows;
    w->column_count = 0;
    w->failed = 0;
}

static void df_writer_add(df_writer *w, const char *name, uint8_t type,
                          const void *values, const uint8_t *validity) {
    if (w->column_count == DF_MAX_OUTPUT_COLUMNS) {
        w->failed = 1;
        return;
    }
    df_output_column *col = &w->columns[w->column_count++];
    memset(col, 0, sizeof *col);
    col->name = name;
    col->type = type;
    col->values = values;
    col->validity = validity;
}

/* int64, timestamp and float64 columns: `rows` 8-byte values; validity is a
 * bitmap (bit i set = present) or NULL when nothing is null. */
static void df_writer_add_i64(df_writer *w, const char *name, const int64_t *values,
                              const uint8_t *validity) {
    df_writer_add(w, name, DF_INT64, values, validity);
}

static void df_writer_add_timestamp(df_writer *w, const char *name,
                                    const int64_t *micros, const uint8_t *validity) {
    df_writer_add(w, name, DF_TIMESTAMP, micros, validity);
}

static void df_writer_add_f64(df_writer *w, const char *name, const double *values,
                              const uint8_t *validity) {
    df_writer_add(w, name, DF_FLOAT64, values, validity);
}

/* bool columns: one byte per row, 0 or 1. */
static void df_writer_add_bool(df_writer *w, const char *name, const uint8_t *values,
                               const uint8_t *validity) {
    df_writer_add(w, name, DF_BOOL, values, validity);
}

static void df_writer_add_utf8(df_writer *w, const char *name, const df_utf8_builder *b) {
    if (b->failed || b->rows != w->rows) {
        w->failed = 1;
        return;
    }
    df_writer_add(w, name, DF_UTF8, NULL, b->validity);
    w->columns[w->column_count - 1].offsets = b->offsets;
    w->columns[w->column_count - 1].bytes = b->bytes;
}

static size_t df_value_bytes(const df_output_column *col, uint32_t rows) {
    switch (col->type) {
    case DF_BOOL:
        return rows;
    case DF_UTF8:
        return df_pad8(4 * ((size_t)rows + 1)) + col->offsets[rows];
    default:
        return 8 * (size_t)rows;
    }
}

/* Encode the batch and set it as the call's output. Returns 0, or the
 * status of df_fail() when a column could not be built. */
static int32_t df_writer_output(df_writer *w) {
    if (w->failed) return df_fail("could not build the output batch (out of memory or a column of the wrong length)");
    size_t rows = w->rows;
    size_t bitmap = df_pad8((rows + 7) / 8);
    size_t header = 16;
    for (uint32_t c = 0; c < w->column_count; c++) header += 12 + strlen(w->columns[c].name);
    size_t total = df_pad8(header);
    size_t starts[DF_MAX_OUTPUT_COLUMNS];
    size_t lengths[DF_MAX_OUTPUT_COLUMNS];
    for (uint32_t c = 0; c < w->column_count; c++) {
        const df_output_column *col = &w->columns[c];
        starts[c] = total;
        lengths[c] = (col->validity ? bitmap : 0) + df_value_bytes(col, w->rows);
        total = df_pad8(total + lengths[c]);
    }
    uint8_t *out = (uint8_t *)calloc(total, 1);
    if (out == NULL) return df_fail("out of memory building the output batch");
    uint16_t version = 1;
    memcpy(out, "DFB1", 4);
    memcpy(out + 4, &version, 2);
    memcpy(out + 8, &w->rows, 4);
    memcpy(out + 12, &w->column_count, 4);
    size_t cursor = 16;
    for (uint32_t c = 0; c < w->column_count; c++) {
        const df_output_column *col = &w->columns[c];
        uint16_t name_length = (uint16_t)strlen(col->name);
        uint32_t start = (uint32_t)starts[c], length = (uint32_t)lengths[c];
        out[cursor] = col->type;
        out[cursor + 1] = col->validity != NULL;
        memcpy(out + cursor + 2, &name_length, 2);
        memcpy(out + cursor + 4, &start, 4);
        memcpy(out + cursor + 8, &length, 4);
        memcpy(out + cursor + 12, col->name, name_length);
        cursor += 12 + name_length;
        uint8_t *at = out + starts[c];
        if (col->validity != NULL) {
            memcpy(at, col->validity, (rows + 7) / 8);
            at += bitmap;
        }
        if (col->type == DF_UTF8) {
            memcpy(at, col->offsets, 4 * (rows + 1));
            at += df_pad8(4 * (rows + 1));
            memcpy(at, col->bytes, col->offsets[rows]);
        } else {
            memcpy(at, col->values, df_value_bytes(col, w->rows));
        }
    }
    int32_t status = df_output(out, total);
    free(out);
    return status == 0 ? 0 : df_fail("out of kernel memory for the output");
}

#endif /* DATAFLARE_PLUGIN_H */
