//! dataflare.zig: write DataFlare WebAssembly plugins in Zig.
//!
//! Declares the Extism kernel functions a plugin needs (import module
//! "extism:host/env") and reads and writes the v1 batch encoding
//! (docs/plugin-batch-encoding.md). Build a plugin with
//!
//!   python -m ziglang build-exe -target wasm32-freestanding -fno-entry \
//!       -rdynamic -O ReleaseSafe --dep dataflare -Mroot=plugin.zig \
//!       -Mdataflare=path/to/sdk/zig/dataflare.zig -femit-bin=plugin.wasm
//!
//! (`dataflare plugin build` runs exactly that) and export functions that
//! take nothing and return 0 on success:
//!
//!   const df = @import("dataflare");
//!   export fn process() i32 {
//!       var batch = df.Batch.input() catch |err| return df.fail(df.errorText(err));
//!       defer batch.deinit();
//!       ...
//!   }
//!
//! ReleaseSafe keeps bounds and overflow checks: a bug traps, the host
//! rejects that batch and starts a fresh instance.

const std = @import("std");

/// The Extism kernel. Pointers (u64) are offsets into Extism's memory.
pub const kernel = struct {
    pub extern "extism:host/env" fn input_length() u64;
    pub extern "extism:host/env" fn input_load_u8(offset: u64) u8;
    pub extern "extism:host/env" fn input_load_u64(offset: u64) u64;
    pub extern "extism:host/env" fn alloc(length: u64) u64;
    pub extern "extism:host/env" fn free(pointer: u64) void;
    pub extern "extism:host/env" fn length(pointer: u64) u64;
    pub extern "extism:host/env" fn load_u8(pointer: u64) u8;
    pub extern "extism:host/env" fn load_u64(pointer: u64) u64;
    pub extern "extism:host/env" fn store_u8(pointer: u64, value: u8) void;
    pub extern "extism:host/env" fn store_u64(pointer: u64, value: u64) void;
    pub extern "extism:host/env" fn output_set(pointer: u64, length: u64) void;
    pub extern "extism:host/env" fn error_set(pointer: u64) void;
    pub extern "extism:host/env" fn config_get(key_pointer: u64) u64;
    pub extern "extism:host/env" fn log_info(pointer: u64) void;
};

/// The allocator plugins use; memory grows up to the manifest's limit.
pub const allocator = std.heap.wasm_allocator;

pub const Type = enum(u8) { int64 = 1, float64 = 2, boolean = 3, utf8 = 4, timestamp = 5 };

pub const Error = error{ OutOfMemory, NotABatch, UnsupportedVersion, Truncated, UnknownType, TooManyColumns, WrongLength };

/// Return a message for an error of this module, for `fail`.
pub fn errorText(err: anyerror) []const u8 {
    return switch (err) {
        error.OutOfMemory => "out of memory",
        error.NotABatch => "input is not a DFB1 batch",
        error.UnsupportedVersion => "input batch has an unknown version",
        error.Truncated => "input batch is truncated",
        error.UnknownType => "input batch has a column of unknown type",
        error.TooManyColumns => "too many output columns",
        error.WrongLength => "an output column has the wrong number of rows",
        else => @errorName(err),
    };
}

fn pad8(n: usize) usize {
    return (n + 7) & ~@as(usize, 7);
}

// ---- kernel memory ------------------------------------------------------

/// Copy bytes into a new kernel block and return its pointer.
pub fn kernelStore(bytes: []const u8) u64 {
    const pointer = kernel.alloc(bytes.len);
    var i: usize = 0;
    while (i + 8 <= bytes.len) : (i += 8) {
        kernel.store_u64(pointer + i, std.mem.readInt(u64, bytes[i..][0..8], .little));
    }
    while (i < bytes.len) : (i += 1) kernel.store_u8(pointer + i, bytes[i]);
    return pointer;
}

fn kernelLoad(pointer: u64, out: []u8) void {
    var i: usize = 0;
    while (i + 8 <= out.len) : (i += 8) {
        std.mem.writeInt(u64, out[i..][0..8], kernel.load_u64(pointer + i), .little);
    }
    while (i < out.len) : (i += 1) out[i] = kernel.load_u8(pointer + i);
}

/// Report that the batch failed with `message`; returns the status 1.
pub fn fail(message: []const u8) i32 {
    kernel.error_set(kernelStore(message));
    return 1;
}

/// Set the call's output.
pub fn output(bytes: []const u8) void {
    kernel.output_set(kernelStore(bytes), bytes.len);
}

/// Return the config value for `key` (JSON text for non-strings), or null.
/// Free it with `allocator.free`.
pub fn config(key: []const u8) Error!?[]u8 {
    const key_pointer = kernelStore(key);
    defer kernel.free(key_pointer);
    const value = kernel.config_get(key_pointer);
    if (value == 0) return null;
    defer kernel.free(value);
    const text = try allocator.alloc(u8, @intCast(kernel.length(value)));
    kernelLoad(value, text);
    return text;
}

// ---- reading a batch ----------------------------------------------------

pub const Column = struct {
    name: []const u8,
    type: Type,
    rows: u32,
    validity: ?[]const u8 = null,
    values: []const u8 = &.{},
    offsets: []const u8 = &.{},
    bytes: []const u8 = &.{},

    pub inline fn isNull(self: *const Column, row: u32) bool {
        const bits = self.validity orelse return false;
        return (bits[row >> 3] >> @intCast(row & 7)) & 1 == 0;
    }

    pub inline fn int64(self: *const Column, row: u32) i64 {
        return std.mem.readInt(i64, self.values[8 * row ..][0..8], .little);
    }

    pub inline fn float64(self: *const Column, row: u32) f64 {
        return @bitCast(std.mem.readInt(u64, self.values[8 * row ..][0..8], .little));
    }

    /// Return an int64, timestamp or float64 value as f64.
    pub inline fn number(self: *const Column, row: u32) f64 {
        return if (self.type == .float64) self.float64(row) else @floatFromInt(self.int64(row));
    }

    pub inline fn boolean(self: *const Column, row: u32) bool {
        return self.values[row] != 0;
    }

    pub inline fn text(self: *const Column, row: u32) []const u8 {
        const start = std.mem.readInt(u32, self.offsets[4 * row ..][0..4], .little);
        const end = std.mem.readInt(u32, self.offsets[4 * (row + 1) ..][0..4], .little);
        return self.bytes[start..end];
    }
};

pub const Batch = struct {
    rows: u32,
    columns: []Column,
    buffer: []u64 = &.{},

    /// Read the call's input batch; `deinit` it when done.
    pub fn input() Error!Batch {
        const n: usize = @intCast(kernel.input_length());
        const words = try allocator.alloc(u64, (n + 7) / 8);
        errdefer allocator.free(words);
        const bytes = std.mem.sliceAsBytes(words)[0..n];
        var i: usize = 0;
        while (i + 8 <= n) : (i += 8) words[i / 8] = kernel.input_load_u64(i);
        while (i < n) : (i += 1) bytes[i] = kernel.input_load_u8(i);
        var batch = try parse(bytes);
        batch.buffer = words;
        return batch;
    }

    /// Parse a DFB1 batch; the columns point into `bytes`.
    pub fn parse(bytes: []const u8) Error!Batch {
        if (bytes.len < 16 or !std.mem.eql(u8, bytes[0..4], "DFB1")) return error.NotABatch;
        if (std.mem.readInt(u16, bytes[4..6], .little) != 1) return error.UnsupportedVersion;
        const rows = std.mem.readInt(u32, bytes[8..12], .little);
        const count = std.mem.readInt(u32, bytes[12..16], .little);
        if (count > bytes.len / 12) return error.Truncated;
        const columns = try allocator.alloc(Column, count);
        errdefer allocator.free(columns);
        var cursor: usize = 16;
        const n: usize = rows;
        for (columns) |*col| {
            if (cursor + 12 > bytes.len) return error.Truncated;
            const code = bytes[cursor];
            const has_validity = bytes[cursor + 1] != 0;
            const name_length: usize = std.mem.readInt(u16, bytes[cursor + 2 ..][0..2], .little);
            const start: usize = std.mem.readInt(u32, bytes[cursor + 4 ..][0..4], .little);
            const size: usize = std.mem.readInt(u32, bytes[cursor + 8 ..][0..4], .little);
            if (cursor + 12 + name_length > bytes.len or start + size > bytes.len) return error.Truncated;
            const kind = std.enums.fromInt(Type, code) orelse return error.UnknownType;
            col.* = .{ .name = bytes[cursor + 12 .. cursor + 12 + name_length], .type = kind, .rows = rows };
            cursor += 12 + name_length;
            const block = bytes[start .. start + size];
            var at: usize = 0;
            if (has_validity) {
                const bitmap_bytes = (n + 7) / 8;
                if (bitmap_bytes > block.len) return error.Truncated;
                col.validity = block[0..bitmap_bytes];
                at = pad8(bitmap_bytes);
            }
            switch (kind) {
                .int64, .float64, .timestamp => {
                    if (at + 8 * n > block.len) return error.Truncated;
                    col.values = block[at .. at + 8 * n];
                },
                .boolean => {
                    if (at + n > block.len) return error.Truncated;
                    col.values = block[at .. at + n];
                },
                .utf8 => {
                    if (at + 4 * (n + 1) > block.len) return error.Truncated;
                    col.offsets = block[at .. at + 4 * (n + 1)];
                    const total: usize = std.mem.readInt(u32, col.offsets[4 * n ..][0..4], .little);
                    at = pad8(at + 4 * (n + 1));
                    if (at + total > block.len) return error.Truncated;
                    col.bytes = block[at .. at + total];
                },
            }
        }
        return .{ .rows = rows, .columns = columns };
    }

    /// Return the column of that name, or null.
    pub fn column(self: *const Batch, name: []const u8) ?*const Column {
        for (self.columns) |*c| {
            if (std.mem.eql(u8, c.name, name)) return c;
        }
        return null;
    }

    pub fn deinit(self: *Batch) void {
        allocator.free(self.columns);
        if (self.buffer.len > 0) allocator.free(self.buffer);
    }
};

// ---- the output of a filter ---------------------------------------------

/// Allocate a zeroed bitmap of `rows` bits; free it with `allocator.free`.
pub fn bitmap(rows: u32) Error![]u8 {
    const bits = try allocator.alloc(u8, (@as(usize, rows) + 7) / 8);
    @memset(bits, 0);
    return bits;
}

pub inline fn setBit(bits: []u8, row: u32) void {
    bits[row >> 3] |= @as(u8, 1) << @intCast(row & 7);
}

/// Output a DFS1 selection vector: bit i of `bits` set keeps row i.
pub fn outputSelection(bits: []const u8, rows: u32) Error!void {
    const size = 8 + (@as(usize, rows) + 7) / 8;
    const out = try allocator.alloc(u8, size);
    defer allocator.free(out);
    @memcpy(out[0..4], "DFS1");
    std.mem.writeInt(u32, out[4..8], rows, .little);
    @memcpy(out[8..], bits[0 .. size - 8]);
    output(out);
}

// ---- writing a batch ----------------------------------------------------

/// Return a growable array type, enough for the builders below.
fn Growable(comptime T: type) type {
    return struct {
        items: []T = &.{},
        len: usize = 0,

        const Self = @This();

        fn ensure(self: *Self, wanted: usize) Error!void {
            if (wanted <= self.items.len) return;
            var size = @max(self.items.len * 2, 16);
            while (size < wanted) size *= 2;
            self.items = if (self.items.len == 0)
                try allocator.alloc(T, size)
            else
                try allocator.realloc(self.items, size);
        }

        fn push(self: *Self, value: T) Error!void {
            try self.ensure(self.len + 1);
            self.items[self.len] = value;
            self.len += 1;
        }

        fn used(self: *const Self) []const T {
            return self.items[0..self.len];
        }

        fn deinit(self: *Self) void {
            if (self.items.len > 0) allocator.free(self.items);
            self.* = .{};
        }
    };
}

/// Validity bitmap under construction: only kept once a null shows up.
const Validity = struct {
    bits: Growable(u8) = .{},
    has_null: bool = false,

    fn mark(self: *Validity, row: usize, present: bool) Error!void {
        try self.bits.ensure(row / 8 + 1);
        while (self.bits.len < row / 8 + 1) {
            self.bits.items[self.bits.len] = 0;
            self.bits.len += 1;
        }
        if (present) {
            self.bits.items[row / 8] |= @as(u8, 1) << @intCast(row & 7);
        } else {
            self.has_null = true;
        }
    }

    fn slice(self: *const Validity) ?[]const u8 {
        return if (self.has_null) self.bits.used() else null;
    }
};

/// Builds a utf8 column.
pub const Utf8Builder = struct {
    offsets: Growable(u32) = .{},
    bytes: Growable(u8) = .{},
    validity: Validity = .{},
    rows: usize = 0,

    pub fn append(self: *Utf8Builder, value: []const u8) Error!void {
        if (self.offsets.len == 0) try self.offsets.push(0);
        try self.bytes.ensure(self.bytes.len + value.len);
        @memcpy(self.bytes.items[self.bytes.len .. self.bytes.len + value.len], value);
        self.bytes.len += value.len;
        try self.validity.mark(self.rows, true);
        try self.offsets.push(@intCast(self.bytes.len));
        self.rows += 1;
    }

    pub fn appendNull(self: *Utf8Builder) Error!void {
        if (self.offsets.len == 0) try self.offsets.push(0);
        try self.validity.mark(self.rows, false);
        try self.offsets.push(@intCast(self.bytes.len));
        self.rows += 1;
    }

    pub fn deinit(self: *Utf8Builder) void {
        self.offsets.deinit();
        self.bytes.deinit();
        self.validity.bits.deinit();
    }
};

/// Builds an int64 or timestamp column (i64), a float64 column (f64) or a
/// bool column (u8, 0 or 1).
pub fn NumberBuilder(comptime T: type) type {
    return struct {
        values: Growable(T) = .{},
        validity: Validity = .{},

        const Self = @This();

        pub fn append(self: *Self, value: T) Error!void {
            try self.validity.mark(self.values.len, true);
            try self.values.push(value);
        }

        pub fn appendNull(self: *Self) Error!void {
            try self.validity.mark(self.values.len, false);
            try self.values.push(0);
        }

        pub fn deinit(self: *Self) void {
            self.values.deinit();
            self.validity.bits.deinit();
        }
    };
}

/// A bool column under construction: append 0 or 1.
pub const BoolBuilder = NumberBuilder(u8);

const OutputColumn = struct {
    name: []const u8,
    type: Type,
    validity: ?[]const u8,
    values: []const u8 = &.{},
    offsets: []const u8 = &.{},
    bytes: []const u8 = &.{},
};

pub const max_output_columns = 64;

/// An output batch: add built columns, then `output()`.
pub const Writer = struct {
    rows: u32,
    columns: [max_output_columns]OutputColumn = undefined,
    count: usize = 0,

    pub fn init(rows: u32) Writer {
        return .{ .rows = rows };
    }

    fn add(self: *Writer, column: OutputColumn) Error!void {
        if (self.count == max_output_columns) return error.TooManyColumns;
        self.columns[self.count] = column;
        self.count += 1;
    }

    pub fn addUtf8(self: *Writer, name: []const u8, b: *const Utf8Builder) Error!void {
        if (b.rows != self.rows) return error.WrongLength;
        try self.add(.{
            .name = name,
            .type = .utf8,
            .validity = b.validity.slice(),
            .offsets = std.mem.sliceAsBytes(b.offsets.used()),
            .bytes = b.bytes.used(),
        });
    }

    pub fn addInt64(self: *Writer, name: []const u8, b: *const NumberBuilder(i64)) Error!void {
        if (b.values.len != self.rows) return error.WrongLength;
        try self.add(.{ .name = name, .type = .int64, .validity = b.validity.slice(), .values = std.mem.sliceAsBytes(b.values.used()) });
    }

    /// Microseconds since the epoch, UTC.
    pub fn addTimestamp(self: *Writer, name: []const u8, b: *const NumberBuilder(i64)) Error!void {
        if (b.values.len != self.rows) return error.WrongLength;
        try self.add(.{ .name = name, .type = .timestamp, .validity = b.validity.slice(), .values = std.mem.sliceAsBytes(b.values.used()) });
    }

    pub fn addFloat64(self: *Writer, name: []const u8, b: *const NumberBuilder(f64)) Error!void {
        if (b.values.len != self.rows) return error.WrongLength;
        try self.add(.{ .name = name, .type = .float64, .validity = b.validity.slice(), .values = std.mem.sliceAsBytes(b.values.used()) });
    }

    pub fn addBool(self: *Writer, name: []const u8, b: *const BoolBuilder) Error!void {
        if (b.values.len != self.rows) return error.WrongLength;
        try self.add(.{ .name = name, .type = .boolean, .validity = b.validity.slice(), .values = b.values.used() });
    }

    /// Encode the batch and set it as the call's output.
    pub fn output(self: *const Writer) Error!void {
        const n: usize = self.rows;
        const bitmap_size = pad8((n + 7) / 8);
        var header: usize = 16;
        for (self.columns[0..self.count]) |c| header += 12 + c.name.len;
        var total = pad8(header);
        var starts: [max_output_columns]usize = undefined;
        var lengths: [max_output_columns]usize = undefined;
        for (self.columns[0..self.count], 0..) |c, i| {
            starts[i] = total;
            var size: usize = if (c.validity != null) bitmap_size else 0;
            size += if (c.type == .utf8) pad8(4 * (n + 1)) + c.bytes.len else c.values.len;
            lengths[i] = size;
            total = pad8(total + size);
        }
        const words = try allocator.alloc(u64, total / 8);
        defer allocator.free(words);
        const out = std.mem.sliceAsBytes(words);
        @memset(out, 0);
        @memcpy(out[0..4], "DFB1");
        std.mem.writeInt(u16, out[4..6], 1, .little);
        std.mem.writeInt(u32, out[8..12], self.rows, .little);
        std.mem.writeInt(u32, out[12..16], @intCast(self.count), .little);
        var cursor: usize = 16;
        for (self.columns[0..self.count], 0..) |c, i| {
            out[cursor] = @intFromEnum(c.type);
            out[cursor + 1] = if (c.validity != null) 1 else 0;
            std.mem.writeInt(u16, out[cursor + 2 ..][0..2], @intCast(c.name.len), .little);
            std.mem.writeInt(u32, out[cursor + 4 ..][0..4], @intCast(starts[i]), .little);
            std.mem.writeInt(u32, out[cursor + 8 ..][0..4], @intCast(lengths[i]), .little);
            @memcpy(out[cursor + 12 .. cursor + 12 + c.name.len], c.name);
            cursor += 12 + c.name.len;
            var at = starts[i];
            if (c.validity) |bits| {
                const used = (n + 7) / 8;
                @memcpy(out[at .. at + used], bits[0..used]);
                at += bitmap_size;
            }
            if (c.type == .utf8) {
                @memcpy(out[at .. at + c.offsets.len], c.offsets);
                at = pad8(at + 4 * (n + 1));
                @memcpy(out[at .. at + c.bytes.len], c.bytes);
            } else {
                @memcpy(out[at .. at + c.values.len], c.values);
            }
        }
        dataflare_output(out);
    }
};

fn dataflare_output(bytes: []const u8) void {
    output(bytes);
}
