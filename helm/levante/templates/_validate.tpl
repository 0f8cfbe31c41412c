{{/*
Checks that need more than one value (values.schema.json checks each value alone). Each failure
names the values to change. Rendered by validate.yaml, so `helm template`, `helm install` and
`helm lint` all stop on them.
*/}}
{{- define "levante.validate" -}}
{{- $lv := .Values.levante }}

{{- /* KubeRay takes a RayService name only as a DNS-1035 label (a letter first) of at most 47 characters. */}}
{{- $name := include "levante.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q (from the release name, or fullnameOverride) must start with a letter and hold only a-z, 0-9 and '-' (KubeRay wants a DNS-1035 label); set fullnameOverride" $name) }}
{{- end }}

{{- /* Keys of the cluster config that the chart sets itself. */}}
{{- if hasKey $lv "ray" }}
{{- fail "levante.ray: set by the chart (the front door joins the RayService's Ray cluster: ray.address auto, ray.deploy false); remove it" }}
{{- end }}
{{- $fd := default (dict) $lv.frontdoor }}
{{- if hasKey $fd "host" }}
{{- fail "levante.frontdoor.host: set by the chart (0.0.0.0 inside the pod); remove it" }}
{{- end }}
{{- if hasKey $fd "tls" }}
{{- fail "levante.frontdoor.tls: set by the chart from tls.* (the certificate Secret is mounted at /etc/levante/tls); remove it and set tls.enabled and tls.secretName" }}
{{- end }}
{{- if hasKey (dig "telemetry" "metrics" (dict) $lv) "host" }}
{{- fail "levante.telemetry.metrics.host: set by the chart (0.0.0.0 inside the pod); remove it" }}
{{- end }}
{{- if and .Values.monitoring.serviceMonitor.enabled (not (include "levante.metricsEnabled" .)) }}
{{- fail "monitoring.serviceMonitor.enabled: the front door serves /metrics only with levante.telemetry.metrics.enabled; turn that on too" }}
{{- end }}
{{- range $i, $t := (default (list) $fd.tenants) }}
{{- if $t.api_key }}
{{- fail (printf "levante.frontdoor.tenants[%d].api_key: would be written into a ConfigMap and the RayService; use api_key_env and set that variable from a Secret in frontdoor.env" $i) }}
{{- end }}
{{- end }}

{{- /* TLS: Secrets must be named, and the kubelet's probes must be able to pass. */}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.secretName: required when tls.enabled is true (a kubernetes.io/tls Secret with the front door's certificate and key)" }}
{{- end }}
{{- end }}
{{- if .Values.tls.clientCA.enabled }}
{{- if not .Values.tls.enabled }}
{{- fail "tls.clientCA.enabled: mutual TLS needs server TLS too; set tls.enabled and tls.secretName" }}
{{- end }}
{{- if eq .Values.frontdoor.probes.handler "grpc" }}
{{- fail "frontdoor.probes.handler: grpc cannot pass with tls.clientCA.enabled (mutual TLS): the kubelet's gRPC probe presents no client certificate; set frontdoor.probes.handler to tcp" }}
{{- end }}
{{- end }}

{{- /* Peers' TLS files must come from the mounted peerTLS Secret. */}}
{{- $peerDir := include "levante.peerTLSDir" . }}
{{- $regions := default (dict) $lv.regions }}
{{- range $i, $p := (default (list) $regions.peers) }}
{{- range $k := list "tls_ca" "tls_cert" "tls_key" }}
{{- $path := index $p $k }}
{{- if $path }}
{{- if not $.Values.peerTLS.secretName }}
{{- fail (printf "levante.regions.peers[%d].%s: set, but peerTLS.secretName is empty, so nothing is mounted at %s" $i $k $peerDir) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" $peerDir) $path) }}
{{- fail (printf "levante.regions.peers[%d].%s: %q is not in %s/, where peerTLS.secretName is mounted" $i $k $path $peerDir) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- /* A budget no eviction can meet would stall every node drain. */}}
{{- if and .Values.frontdoor.pdb.enabled (ge (int .Values.frontdoor.pdb.minAvailable) (int .Values.frontdoor.replicas)) }}
{{- fail (printf "frontdoor.pdb.minAvailable: %d with frontdoor.replicas %d lets no node drain evict a front door; raise frontdoor.replicas or lower minAvailable" (int .Values.frontdoor.pdb.minAvailable) (int .Values.frontdoor.replicas)) }}
{{- end }}

{{- /* Worker group names become pod and group names: no duplicates. */}}
{{- $names := list }}
{{- range .Values.rayCluster.workerGroups }}
{{- if has .name $names }}
{{- fail (printf "rayCluster.workerGroups: the name %q is used twice" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}

{{- /*
Capacity: every replica is an expert-parallel group of ep_size ranks; every rank a placement-group
bundle {CPU: cpus_per_rank, GPU: 1} (gpu) or {CPU: cpus_per_rank} (cpu), placed on worker pods only
(the head and the front door offer no CPUs or GPUs to Ray). A pod holds
min(gpu, floor(cpu / cpus_per_rank)) ranks (gpu) or floor(cpu / cpus_per_rank) (cpu).
*/}}
{{- $r := $lv.replica }}
{{- $replicas := int $r.num_replicas }}
{{- $ep := int $r.ep_size }}
{{- $cpr := float64 $r.cpus_per_rank }}
{{- $gpu := eq $r.accelerator "gpu" }}
{{- $need := mul $replicas $ep }}
{{- $total := 0 }}
{{- $podsWithRanks := 0 }}
{{- $packedGroups := 0 }}
{{- $parts := list }}
{{- range .Values.rayCluster.workerGroups }}
{{- $perPod := 1000000 }}
{{- if gt $cpr 0.0 }}
{{- $perPod = int (floor (divf (float64 .cpu) $cpr)) }}
{{- end }}
{{- if $gpu }}
{{- $perPod = min (int (default 0 .gpu)) $perPod }}
{{- end }}
{{- $total = add $total (mul (int .replicas) $perPod) }}
{{- if gt $perPod 0 }}
{{- $podsWithRanks = add $podsWithRanks (int .replicas) }}
{{- end }}
{{- $packedGroups = add $packedGroups (mul (int .replicas) (div $perPod $ep)) }}
{{- $parts = append $parts (printf "%s: %d pod(s) x %d rank(s)" .name (int .replicas) $perPod) }}
{{- end }}
{{- $bundle := ternary (printf "one GPU and %v CPU each" $cpr) (printf "%v CPU each" $cpr) $gpu }}
{{- if lt $total $need }}
{{- fail (printf "levante.replica: %d replica(s) x ep_size %d = %d expert-parallel ranks (%s), but rayCluster.workerGroups hold %d (%s); add worker pods, GPUs or CPUs, or lower replica.num_replicas or replica.ep_size" $replicas $ep $need $bundle $total (join ", " $parts)) }}
{{- end }}
{{- if and (eq $r.placement_strategy "STRICT_PACK") (lt $packedGroups $replicas) }}
{{- fail (printf "levante.replica.placement_strategy: STRICT_PACK puts all %d ranks of a replica on one pod, but the worker pods fit only %d such replica(s) of the %d asked (%s)" $ep $packedGroups $replicas (join ", " $parts)) }}
{{- end }}
{{- if and (eq $r.placement_strategy "STRICT_SPREAD") (lt $podsWithRanks $ep) }}
{{- fail (printf "levante.replica.placement_strategy: STRICT_SPREAD puts each of a replica's %d ranks on its own pod, but only %d worker pod(s) can hold a rank" $ep $podsWithRanks) }}
{{- end }}
{{- end }}
