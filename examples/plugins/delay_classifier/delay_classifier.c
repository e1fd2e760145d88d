/* delay_classifier: add `delay_class` from `dep_delay`.
 *
 *   dep_delay <= on_time_max (15)  -> "on_time"
 *   dep_delay <= late_max (60)     -> "late"
 *   otherwise                      -> "very_late"
 *   null                           -> null
 */
#include "dataflare_plugin.h"

static double on_time_max = 15;
static double late_max = 60;

/* Read the thresholds once per instance; reject a config that makes no sense. */
DF_EXPORT("open") int32_t plugin_open(void) {
    if (df_config_number("on_time_max", &on_time_max) < 0)
        return df_fail("config on_time_max must be a number");
    if (df_config_number("late_max", &late_max) < 0)
        return df_fail("config late_max must be a number");
    if (late_max < on_time_max)
        return df_fail("config late_max must not be below on_time_max");
    return 0;
}

DF_EXPORT("classify") int32_t classify(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    const df_column *delay = df_batch_column(&batch, "dep_delay");
    if (delay == NULL || (delay->type != DF_INT64 && delay->type != DF_FLOAT64)) {
        df_batch_release(&batch);
        return df_fail("the batch has no numeric column dep_delay");
    }
    df_utf8_builder classes;
    df_utf8_init(&classes, batch.rows);
    for (uint32_t row = 0; row < batch.rows; row++) {
        if (df_is_null(delay, row)) {
            df_utf8_append_null(&classes);
            continue;
        }
        double minutes = df_get_number(delay, row);
        if (minutes <= on_time_max) df_utf8_append_cstr(&classes, "on_time");
        else if (minutes <= late_max) df_utf8_append_cstr(&classes, "late");
        else df_utf8_append_cstr(&classes, "very_late");
    }
    df_writer out;
    df_writer_init(&out, batch.rows);
    df_writer_add_utf8(&out, "delay_class", &classes);
    int32_t status = df_writer_output(&out);
    df_utf8_release(&classes);
    df_batch_release(&batch);
    return status;
}
