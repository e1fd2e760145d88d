//! pii_masker: mask a text field, keeping its last `keep` characters.
//!
//! Each masked character (a Unicode code point) becomes one `mask`
//! character. A value of `keep` characters or fewer is masked whole, so a
//! short value is never shown. Null stays null.

const std = @import("std");
const df = @import("dataflare");

var keep: usize = 4;
var mask_char: [4]u8 = .{ '*', 0, 0, 0 };
var mask_len: usize = 1;

/// Read `keep` and `mask` from the config; a bad value fails the start.
export fn open() i32 {
    if (df.config("keep") catch return df.fail("out of memory")) |text| {
        defer df.allocator.free(text);
        keep = std.fmt.parseInt(usize, text, 10) catch return df.fail("config keep must be a whole number");
    }
    if (df.config("mask") catch return df.fail("out of memory")) |text| {
        defer df.allocator.free(text);
        const width = std.unicode.utf8ByteSequenceLength(if (text.len > 0) text[0] else 0) catch 0;
        if (text.len == 0 or width != text.len) return df.fail("config mask must be exactly one character");
        @memcpy(mask_char[0..text.len], text);
        mask_len = text.len;
    }
    return 0;
}

export fn mask() i32 {
    return run() catch |err| df.fail(df.errorText(err));
}

fn run() df.Error!i32 {
    var batch = try df.Batch.input();
    defer batch.deinit();
    const value = batch.column("value") orelse return df.fail("the batch has no column value");
    if (value.type != .utf8) return df.fail("column value must be text (utf8)");

    var masked = df.Utf8Builder{};
    defer masked.deinit();
    var scratch: []u8 = &.{};
    defer if (scratch.len > 0) df.allocator.free(scratch);

    var row: u32 = 0;
    while (row < batch.rows) : (row += 1) {
        if (value.isNull(row)) {
            try masked.appendNull();
            continue;
        }
        const text = value.text(row);
        // Count code points: every byte that does not continue a sequence.
        var chars: usize = 0;
        for (text) |byte| chars += @intFromBool(byte & 0xC0 != 0x80);
        const hidden = if (chars <= keep) chars else chars - keep;
        // Find where the kept tail starts.
        var seen: usize = 0;
        var tail: usize = text.len;
        for (text, 0..) |byte, i| {
            if (byte & 0xC0 != 0x80) {
                if (seen == hidden) {
                    tail = i;
                    break;
                }
                seen += 1;
            }
        }
        const size = hidden * mask_len + (text.len - tail);
        if (scratch.len < size) {
            if (scratch.len > 0) df.allocator.free(scratch);
            scratch = try df.allocator.alloc(u8, @max(size, 64));
        }
        var at: usize = 0;
        for (0..hidden) |_| {
            @memcpy(scratch[at .. at + mask_len], mask_char[0..mask_len]);
            at += mask_len;
        }
        @memcpy(scratch[at..size], text[tail..]);
        try masked.append(scratch[0..size]);
    }
    var out = df.Writer.init(batch.rows);
    try out.addUtf8("value", &masked);
    try out.output();
    return 0;
}
