// Types the generated dashboard checks (check_schema.mjs) assign the dashboard
// JSON to. Everything comes from @grafana/schema except the Prometheus query
// model, which that package no longer ships (it moved to @grafana/prometheus,
// a UI package with React peers); PrometheusQuery below copies its fields.
import type {
  Dashboard as SchemaDashboard,
  DataQuery,
  DataSourceRef,
  FieldConfig as SchemaFieldConfig,
  FieldConfigSource,
  Panel as SchemaPanel,
  RowPanel as SchemaRowPanel,
} from "@grafana/schema";
import type * as stat from "@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen";
import type * as stateTimeline from "@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen";
import type * as table from "@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen";
import type * as timeseries from "@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";

// The schema declares string-valued fields as TypeScript enums
// (FieldColorModeId, StackingMode, ...), to which a JSON string is not
// assignable; Json<T> swaps each enum for the union of its string values and
// keeps everything else, optionality included, so unknown fields stay
// excess-property errors and a wrong enum value stays a type error.
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

// Grafana's Prometheus query (grafana/packages/grafana-prometheus dataquery).
export interface PrometheusQuery extends Omit<DataQuery, "datasource"> {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  exemplar?: boolean;
  format?: "time_series" | "table" | "heatmap";
  interval?: string;
  intervalFactor?: number;
  editorMode?: "code" | "builder";
}

// A panel of one plugin: the schema's Panel with its loose parts
// (options and fieldConfig.defaults.custom: Record<string, unknown>,
// targets: Array<Record<string, unknown>>) replaced by the plugin's types.
type TypedPanel<TType extends string, TOptions, TCustom> = Omit<
  SchemaPanel,
  "type" | "options" | "fieldConfig" | "targets"
> & {
  type: TType;
  options: TOptions;
  fieldConfig: Omit<FieldConfigSource, "defaults"> & {
    defaults: Omit<SchemaFieldConfig, "custom"> & { custom?: TCustom };
  };
  targets: PrometheusQuery[];
};

export type TimeSeriesPanel = Json<
  TypedPanel<"timeseries", timeseries.Options, timeseries.FieldConfig>
>;
// The stat panel has no custom field config.
export type StatPanel = Json<TypedPanel<"stat", stat.Options, Record<string, never>>>;
export type TablePanel = Json<TypedPanel<"table", table.Options, table.FieldConfig>>;
export type StateTimelinePanel = Json<
  TypedPanel<"state-timeline", stateTimeline.Options, stateTimeline.FieldConfig>
>;
export type RowPanel = Json<SchemaRowPanel>;
export type Dashboard = Json<SchemaDashboard>;
