// dataflare: write DataFlare WebAssembly plugins in AssemblyScript.
//
// Reads and writes the v1 batch encoding (docs/plugin-batch-encoding.md) and
// talks to the Extism kernel directly, so it works with or without
// @extism/as-pdk next to it. Build a plugin with
//
//   npx asc plugin.ts --outFile plugin.wasm -O3 \
//       --path <dataflare>/plugin/sdk/assemblyscript \
//       --use abort=~lib/dataflare/index/dataflareAbort
//
// (`dataflare plugin build` runs exactly that) and import from "dataflare":
//
//   import { Batch, BatchWriter, Float64Builder, fail } from "dataflare";
//
//   export function process(): i32 {
//     const batch = Batch.input();
//     const value = batch.column("value");
//     if (value === null) return fail("the batch has no column value");
//     ...
//   }

@external("extism:host/env", "input_length")
declare function extism_input_length(): u64;
@external("extism:host/env", "input_load_u8")
declare function extism_input_load_u8(offset: u64): u8;
@external("extism:host/env", "input_load_u64")
declare function extism_input_load_u64(offset: u64): u64;
@external("extism:host/env", "alloc")
declare function extism_alloc(length: u64): u64;
@external("extism:host/env", "free")
declare function extism_free(pointer: u64): void;
@external("extism:host/env", "length")
declare function extism_length(pointer: u64): u64;
@external("extism:host/env", "load_u8")
declare function extism_load_u8(pointer: u64): u8;
@external("extism:host/env", "load_u64")
declare function extism_load_u64(pointer: u64): u64;
@external("extism:host/env", "store_u8")
declare function extism_store_u8(pointer: u64, value: u8): void;
@external("extism:host/env", "store_u64")
declare function extism_store_u64(pointer: u64, value: u64): void;
@external("extism:host/env", "output_set")
declare function extism_output_set(pointer: u64, length: u64): void;
@external("extism:host/env", "error_set")
declare function extism_error_set(pointer: u64): void;
@external("extism:host/env", "config_get")
declare function extism_config_get(pointer: u64): u64;

export const INT64: u8 = 1;
export const FLOAT64: u8 = 2;
export const BOOL: u8 = 3;
export const UTF8: u8 = 4;
export const TIMESTAMP: u8 = 5;

// ---- the kernel --------------------------------------------------------

/** Copy `length` bytes at plugin address `source` into a new kernel block. */
function kernelStore(source: usize, length: i32): u64 {
  const pointer = extism_alloc(<u64>length);
  let i = 0;
  for (; i + 8 <= length; i += 8) {
    extism_store_u64(pointer + <u64>i, load<u64>(source + <usize>i));
  }
  for (; i < length; i++) {
    extism_store_u8(pointer + <u64>i, load<u8>(source + <usize>i));
  }
  return pointer;
}

function kernelStoreString(text: string): u64 {
  const bytes = String.UTF8.encode(text);
  return kernelStore(changetype<usize>(bytes), bytes.byteLength);
}

/** Report that the batch failed; return the result: `return fail("...")`. */
export function fail(message: string): i32 {
  extism_error_set(kernelStoreString(message));
  return 1;
}

/** Return the config value for `key` (JSON text for non-strings), or null. */
export function config(key: string): string | null {
  const keyPointer = kernelStoreString(key);
  const value = extism_config_get(keyPointer);
  extism_free(keyPointer);
  if (value == 0) return null;
  const length = <i32>extism_length(value);
  const buffer = new ArrayBuffer(length);
  const base = changetype<usize>(buffer);
  let i = 0;
  for (; i + 8 <= length; i += 8) {
    store<u64>(base + <usize>i, extism_load_u64(value + <u64>i));
  }
  for (; i < length; i++) store<u8>(base + <usize>i, extism_load_u8(value + <u64>i));
  extism_free(value);
  return String.UTF8.decode(buffer);
}

/** Abort handler: pass with --use abort=~lib/dataflare/index/dataflareAbort.
 * Sets an error message starting with "abort:" and traps; the host treats it
 * as a trap and starts a fresh instance. */
export function dataflareAbort(
  message: string | null,
  fileName: string | null,
  line: u32,
  column: u32,
): void {
  let text = "abort: " + (message === null ? "(no message)" : message);
  if (fileName !== null) {
    text += " at " + fileName + ":" + line.toString() + ":" + column.toString();
  }
  extism_error_set(kernelStoreString(text));
  unreachable();
}

function pad8(n: i32): i32 {
  return (n + 7) & ~7;
}

// ---- reading a batch ---------------------------------------------------

/** One input column; values are read in place from the input buffer. */
export class Column {
  name: string;
  type: u8;
  rows: i32;
  validity: usize = 0; // address of the bitmap, 0 when nothing is null
  values: usize = 0; // int64/float64/timestamp/bool values, or utf8 offsets
  bytes: usize = 0; // utf8 text

  constructor(name: string, type: u8, rows: i32) {
    this.name = name;
    this.type = type;
    this.rows = rows;
  }

  @inline isNull(row: i32): bool {
    return this.validity != 0 && ((load<u8>(this.validity + (<usize>row >> 3)) >> (<u8>row & 7)) & 1) == 0;
  }

  @inline getI64(row: i32): i64 {
    return load<i64>(this.values + (<usize>row << 3));
  }

  @inline getF64(row: i32): f64 {
    return load<f64>(this.values + (<usize>row << 3));
  }

  /** Return an int64, timestamp or float64 value as f64. */
  @inline getNumber(row: i32): f64 {
    return this.type == FLOAT64 ? this.getF64(row) : <f64>this.getI64(row);
  }

  @inline getBool(row: i32): bool {
    return load<u8>(this.values + <usize>row) != 0;
  }

  /** Start (address) and length in bytes of a utf8 value. */
  @inline textStart(row: i32): usize {
    return this.bytes + <usize>load<u32>(this.values + (<usize>row << 2));
  }

  @inline textLength(row: i32): i32 {
    const at = this.values + (<usize>row << 2);
    return <i32>(load<u32>(at + 4) - load<u32>(at));
  }

  getString(row: i32): string {
    return String.UTF8.decodeUnsafe(this.textStart(row), this.textLength(row));
  }
}

/** The call's input batch. */
export class Batch {
  rows: i32 = 0;
  columns: Column[] = [];
  private buffer: ArrayBuffer;

  constructor(buffer: ArrayBuffer) {
    this.buffer = buffer;
  }

  /** Read the input; aborts (and so rejects the batch) when it is not DFB1. */
  static input(): Batch {
    const length = <i32>extism_input_length();
    const buffer = new ArrayBuffer(pad8(length));
    const base = changetype<usize>(buffer);
    let i = 0;
    for (; i + 8 <= length; i += 8) {
      store<u64>(base + <usize>i, extism_input_load_u64(<u64>i));
    }
    for (; i < length; i++) store<u8>(base + <usize>i, extism_input_load_u8(<u64>i));
    return Batch.parse(buffer, length);
  }

  static parse(buffer: ArrayBuffer, length: i32): Batch {
    const base = changetype<usize>(buffer);
    assert(length >= 16, "input is not a DFB1 batch");
    assert(load<u32>(base) == 0x31424644, "input is not a DFB1 batch");
    assert(load<u16>(base + 4) == 1, "input batch has an unknown version");
    const batch = new Batch(buffer);
    const rows = <i32>load<u32>(base + 8);
    const count = <i32>load<u32>(base + 12);
    batch.rows = rows;
    let cursor = 16;
    for (let c = 0; c < count; c++) {
      assert(cursor + 12 <= length, "input batch is truncated");
      const type = load<u8>(base + <usize>cursor);
      const hasValidity = load<u8>(base + <usize>cursor + 1);
      const nameLength = <i32>load<u16>(base + <usize>cursor + 2);
      const start = <i32>load<u32>(base + <usize>cursor + 4);
      const size = <i32>load<u32>(base + <usize>cursor + 8);
      assert(cursor + 12 + nameLength <= length, "input batch is truncated");
      assert(start + size <= length, "input batch is truncated");
      const name = String.UTF8.decodeUnsafe(base + <usize>cursor + 12, nameLength);
      cursor += 12 + nameLength;
      const column = new Column(name, type, rows);
      let at = start;
      if (hasValidity) {
        column.validity = base + <usize>at;
        at += pad8((rows + 7) >> 3);
      }
      column.values = base + <usize>at;
      if (type == UTF8) {
        column.bytes = base + <usize>pad8(at + 4 * (rows + 1));
      }
      batch.columns.push(column);
    }
    return batch;
  }

  /** Return the column of that name, or null. */
  column(name: string): Column | null {
    for (let i = 0; i < this.columns.length; i++) {
      if (this.columns[i].name == name) return this.columns[i];
    }
    return null;
  }
}

// ---- the output of a filter --------------------------------------------

/** A bitmap of `rows` bits, all clear. */
export class Bitmap {
  bits: Uint8Array;
  constructor(rows: i32) {
    this.bits = new Uint8Array(pad8((rows + 7) >> 3));
  }
  @inline set(row: i32): void {
    const at = row >> 3;
    this.bits[at] = this.bits[at] | <u8>(<i32>1 << (row & 7));
  }
}

/** Output a DFS1 selection vector keeping the rows whose bit is set. */
export function outputSelection(keep: Bitmap, rows: i32): i32 {
  const bytes = (rows + 7) >> 3;
  const out = new Uint8Array(8 + bytes);
  const base = out.dataStart;
  store<u32>(base, 0x31534644); // "DFS1"
  store<u32>(base + 4, <u32>rows);
  memory.copy(base + 8, keep.bits.dataStart, <usize>bytes);
  extism_output_set(kernelStore(base, out.length), <u64>out.length);
  return 0;
}

// ---- writing a batch ---------------------------------------------------

/** Base of the column builders: row count, type and validity bitmap. */
export class Builder {
  rows: i32 = 0;
  hasNull: bool = false;
  validity: Uint8Array;
  type: u8;
  constructor(capacity: i32, type: u8) {
    this.validity = new Uint8Array(pad8((capacity + 7) >> 3) + 8);
    this.type = type;
  }
  valueBytes(): i32 {
    return 0;
  }
  writeValues(at: usize): void {}

  protected markValid(present: bool): void {
    const need = (this.rows >> 3) + 1;
    if (need > this.validity.length) {
      const grown = new Uint8Array(need * 2);
      grown.set(this.validity);
      this.validity = grown;
    }
    if (present) {
      const at = this.rows >> 3;
      this.validity[at] = this.validity[at] | <u8>(<i32>1 << (this.rows & 7));
    } else {
      this.hasNull = true;
    }
  }
}

/** Builds an int64 (or, with `timestamp`, a timestamp) column. */
export class Int64Builder extends Builder {
  values: StaticArray<i64>;
  constructor(capacity: i32, timestamp: bool = false) {
    super(capacity, timestamp ? TIMESTAMP : INT64);
    this.values = new StaticArray<i64>(capacity > 0 ? capacity : 8);
  }
  private grow(): void {
    if (this.rows < this.values.length) return;
    const grown = new StaticArray<i64>(this.values.length * 2);
    memory.copy(changetype<usize>(grown), changetype<usize>(this.values), <usize>this.rows << 3);
    this.values = grown;
  }
  append(value: i64): void {
    this.grow();
    this.markValid(true);
    unchecked((this.values[this.rows] = value));
    this.rows++;
  }
  appendNull(): void {
    this.grow();
    this.markValid(false);
    unchecked((this.values[this.rows] = 0));
    this.rows++;
  }
  valueBytes(): i32 {
    return this.rows << 3;
  }
  writeValues(at: usize): void {
    memory.copy(at, changetype<usize>(this.values), <usize>this.rows << 3);
  }
}

/** Builds a float64 column. */
export class Float64Builder extends Builder {
  values: StaticArray<f64>;
  constructor(capacity: i32) {
    super(capacity, FLOAT64);
    this.values = new StaticArray<f64>(capacity > 0 ? capacity : 8);
  }
  private grow(): void {
    if (this.rows < this.values.length) return;
    const grown = new StaticArray<f64>(this.values.length * 2);
    memory.copy(changetype<usize>(grown), changetype<usize>(this.values), <usize>this.rows << 3);
    this.values = grown;
  }
  append(value: f64): void {
    this.grow();
    this.markValid(true);
    unchecked((this.values[this.rows] = value));
    this.rows++;
  }
  appendNull(): void {
    this.grow();
    this.markValid(false);
    unchecked((this.values[this.rows] = 0));
    this.rows++;
  }
  valueBytes(): i32 {
    return this.rows << 3;
  }
  writeValues(at: usize): void {
    memory.copy(at, changetype<usize>(this.values), <usize>this.rows << 3);
  }
}

/** Builds a bool column. */
export class BoolBuilder extends Builder {
  values: Uint8Array;
  constructor(capacity: i32) {
    super(capacity, BOOL);
    this.values = new Uint8Array(capacity > 0 ? capacity : 8);
  }
  private grow(): void {
    if (this.rows < this.values.length) return;
    const grown = new Uint8Array(this.values.length * 2);
    grown.set(this.values);
    this.values = grown;
  }
  append(value: bool): void {
    this.grow();
    this.markValid(true);
    this.values[this.rows] = value ? 1 : 0;
    this.rows++;
  }
  appendNull(): void {
    this.grow();
    this.markValid(false);
    this.values[this.rows] = 0;
    this.rows++;
  }
  valueBytes(): i32 {
    return this.rows;
  }
  writeValues(at: usize): void {
    memory.copy(at, this.values.dataStart, <usize>this.rows);
  }
}

/** Builds a utf8 column. */
export class Utf8Builder extends Builder {
  offsets: StaticArray<u32>;
  bytes: Uint8Array;
  byteCount: i32 = 0;
  constructor(capacity: i32) {
    super(capacity, UTF8);
    this.offsets = new StaticArray<u32>((capacity > 0 ? capacity : 8) + 1);
    this.bytes = new Uint8Array(capacity * 8 + 8);
  }
  private grow(extra: i32): void {
    if (this.rows + 1 >= this.offsets.length) {
      const grown = new StaticArray<u32>(this.offsets.length * 2);
      memory.copy(changetype<usize>(grown), changetype<usize>(this.offsets), <usize>(this.rows + 1) << 2);
      this.offsets = grown;
    }
    if (this.byteCount + extra > this.bytes.length) {
      let size = this.bytes.length * 2;
      while (size < this.byteCount + extra) size *= 2;
      const grown = new Uint8Array(size);
      memory.copy(grown.dataStart, this.bytes.dataStart, <usize>this.byteCount);
      this.bytes = grown;
    }
  }
  /** Append `length` bytes of UTF-8 text found at address `start`. */
  appendRaw(start: usize, length: i32): void {
    this.grow(length);
    memory.copy(this.bytes.dataStart + <usize>this.byteCount, start, <usize>length);
    this.byteCount += length;
    this.markValid(true);
    this.rows++;
    unchecked((this.offsets[this.rows] = <u32>this.byteCount));
  }
  append(text: string): void {
    const encoded = String.UTF8.encode(text);
    this.appendRaw(changetype<usize>(encoded), encoded.byteLength);
  }
  appendNull(): void {
    this.grow(0);
    this.markValid(false);
    this.rows++;
    unchecked((this.offsets[this.rows] = <u32>this.byteCount));
  }
  valueBytes(): i32 {
    return pad8(4 * (this.rows + 1)) + this.byteCount;
  }
  writeValues(at: usize): void {
    memory.copy(at, changetype<usize>(this.offsets), <usize>(this.rows + 1) << 2);
    memory.copy(at + <usize>pad8(4 * (this.rows + 1)), this.bytes.dataStart, <usize>this.byteCount);
  }
}

/** An output batch: add built columns, then `output()`. */
export class BatchWriter {
  rows: i32;
  names: string[] = [];
  builders: Builder[] = [];
  constructor(rows: i32) {
    this.rows = rows;
  }
  add(name: string, column: Builder): BatchWriter {
    assert(column.rows == this.rows, "column " + name + " has the wrong number of rows");
    this.names.push(name);
    this.builders.push(column);
    return this;
  }
  /** Encode the batch and set it as the call's output; returns 0. */
  output(): i32 {
    const count = this.names.length;
    const encodedNames = new Array<ArrayBuffer>(count);
    let header = 16;
    for (let c = 0; c < count; c++) {
      encodedNames[c] = String.UTF8.encode(this.names[c]);
      header += 12 + encodedNames[c].byteLength;
    }
    const bitmap = pad8((this.rows + 7) >> 3);
    let total = pad8(header);
    const starts = new StaticArray<i32>(count);
    const lengths = new StaticArray<i32>(count);
    for (let c = 0; c < count; c++) {
      const builder = this.builders[c];
      starts[c] = total;
      lengths[c] = (builder.hasNull ? bitmap : 0) + builder.valueBytes();
      total = pad8(total + lengths[c]);
    }
    const out = new Uint8Array(total);
    const base = out.dataStart;
    store<u32>(base, 0x31424644); // "DFB1"
    store<u16>(base + 4, 1);
    store<u32>(base + 8, <u32>this.rows);
    store<u32>(base + 12, <u32>count);
    let cursor: usize = 16;
    for (let c = 0; c < count; c++) {
      const builder = this.builders[c];
      const name = encodedNames[c];
      store<u8>(base + cursor, builder.type);
      store<u8>(base + cursor + 1, builder.hasNull ? 1 : 0);
      store<u16>(base + cursor + 2, <u16>name.byteLength);
      store<u32>(base + cursor + 4, <u32>starts[c]);
      store<u32>(base + cursor + 8, <u32>lengths[c]);
      memory.copy(base + cursor + 12, changetype<usize>(name), <usize>name.byteLength);
      cursor += 12 + <usize>name.byteLength;
      let at = base + <usize>starts[c];
      if (builder.hasNull) {
        memory.copy(at, builder.validity.dataStart, <usize>((this.rows + 7) >> 3));
        at += <usize>bitmap;
      }
      builder.writeValues(at);
    }
    extism_output_set(kernelStore(base, total), <u64>total);
    return 0;
  }
}
