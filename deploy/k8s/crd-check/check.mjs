// Reads a JSON array of Kubernetes objects on stdin and validates each KEDA / Prometheus Operator object
// against its CRD schema as compiled by kubernetes-models (types, required fields, enums). Unlike the
// core-object check, fields unknown to the CRD are not rejected here.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};
const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));
let failures = 0;
for (const object of input) {
  const key = `${object.apiVersion}/${object.kind}`;
  const Model = models[key];
  const name = `${key} ${object.metadata?.name}`;
  if (!Model) {
    console.log(`UNKNOWN ${name}: no CRD schema here`);
    failures++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`INVALID ${name}: ${String(error.message).slice(0, 500)}`);
    failures++;
  }
}
process.exit(failures ? 1 : 0);
