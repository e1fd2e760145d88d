// running_total: running count and sum of `value` per `key`, kept in plugin
// memory across batches. Rows with a null key or value get null totals and
// do not count.
import {
  Batch,
  BatchWriter,
  Float64Builder,
  Int64Builder,
  FLOAT64,
  INT64,
  UTF8,
  fail,
} from "dataflare";

class Totals {
  count: i64 = 0;
  sum: f64 = 0;
}

const totals = new Map<string, Totals>();

export function process(): i32 {
  const batch = Batch.input();
  const key = batch.column("key");
  const value = batch.column("value");
  if (key === null || key.type != UTF8) return fail("the batch has no utf8 column key");
  if (value === null || (value.type != INT64 && value.type != FLOAT64)) {
    return fail("the batch has no numeric column value");
  }
  const rows = batch.rows;
  const counts = new Int64Builder(rows);
  const sums = new Float64Builder(rows);
  for (let row = 0; row < rows; row++) {
    if (key.isNull(row) || value.isNull(row)) {
      counts.appendNull();
      sums.appendNull();
      continue;
    }
    const name = key.getString(row);
    let entry: Totals;
    if (totals.has(name)) {
      entry = totals.get(name);
    } else {
      entry = new Totals();
      totals.set(name, entry);
    }
    entry.count += 1;
    entry.sum += value.getNumber(row);
    counts.append(entry.count);
    sums.append(entry.sum);
  }
  return new BatchWriter(rows)
    .add("running_count", counts)
    .add("running_sum", sums)
    .output();
}

/** Output the number of keys the plugin keeps, as a one-row batch. */
export function key_count(): i32 {
  const counts = new Int64Builder(1);
  counts.append(totals.size);
  return new BatchWriter(1).add("keys", counts).output();
}
