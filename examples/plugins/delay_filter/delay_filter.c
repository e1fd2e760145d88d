/* delay_filter: keep the records with dep_delay > min_delay (15 by default).
 * A null dep_delay is dropped, as SQL's WHERE would. */
#include "dataflare_plugin.h"

static double min_delay = 15;

DF_EXPORT("open") int32_t plugin_open(void) {
    if (df_config_number("min_delay", &min_delay) < 0)
        return df_fail("config min_delay must be a number");
    return 0;
}

DF_EXPORT("keep_delayed") int32_t keep_delayed(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    const df_column *delay = df_batch_column(&batch, "dep_delay");
    if (delay == NULL || (delay->type != DF_INT64 && delay->type != DF_FLOAT64)) {
        df_batch_release(&batch);
        return df_fail("the batch has no numeric column dep_delay");
    }
    uint8_t *keep = df_bitmap_new(batch.rows);
    if (keep == NULL) {
        df_batch_release(&batch);
        return df_fail("out of memory");
    }
    uint32_t rows = batch.rows;
    if (delay->type == DF_INT64) {
        const int64_t *values = (const int64_t *)delay->values;
        for (uint32_t row = 0; row < rows; row++)
            keep[row >> 3] |= (uint8_t)(((double)values[row] > min_delay) << (row & 7));
    } else {
        const double *values = (const double *)delay->values;
        for (uint32_t row = 0; row < rows; row++)
            keep[row >> 3] |= (uint8_t)((values[row] > min_delay) << (row & 7));
    }
    if (delay->validity != NULL) /* drop nulls: AND with the validity bitmap */
        for (uint32_t i = 0; i < (rows + 7) / 8; i++) keep[i] &= delay->validity[i];
    int32_t status = df_output_selection(keep, rows);
    free(keep);
    df_batch_release(&batch);
    return status;
}
