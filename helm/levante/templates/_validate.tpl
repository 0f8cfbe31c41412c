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
{{- if hasKey (default (dict) $fd.http) "host" }}
{{- fail "levante.frontdoor.http.host: set by the chart (the door's host, 0.0.0.0 inside the pod); remove it" }}
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

{{- /*
Secure by default: the door is reachable from other pods (and through a LoadBalancer from other
networks), so it must encrypt (server TLS) and know its callers (API keys, or client certificates).
*/}}
{{- if not .Values.security.allowInsecure }}
{{- if not .Values.tls.enabled }}
{{- fail "security: the front door would serve plaintext; set tls.enabled and tls.secretName (helm/levante/examples/tls.yaml), or security.allowInsecure: true to accept that" }}
{{- end }}
{{- if and (not $fd.tenants) (not .Values.tls.clientCA.enabled) }}
{{- fail "security: the front door would accept any caller; set levante.frontdoor.tenants (API keys through api_key_env and frontdoor.env) or tls.clientCA.enabled (mutual TLS), or security.allowInsecure: true to accept that" }}
{{- end }}
{{- end }}

{{- /* Peers' TLS files must come from the mounted peerTLS Secret; an API key only travels over TLS. */}}
{{- $peerDir := include "levante.peerTLSDir" . }}
{{- $regions := default (dict) $lv.regions }}
{{- range $i, $p := (default (list) $regions.peers) }}
{{- if and $p.api_key_env (not $p.tls_ca) }}
{{- fail (printf "levante.regions.peers[%d].api_key_env: the key would travel in plaintext; set levante.regions.peers[%d].tls_ca (a file of peerTLS.secretName) to call %q over TLS" $i $i (toString $p.name)) }}
{{- end }}
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
The engine: vLLM's keys only with backend vllm (the config refuses them otherwise), one rank per
replica with vllm (vLLM splits the experts itself), a device that agrees with replica.accelerator.
The same rules as cluster/config.py, checked here so `helm template` stops instead of a pod.
*/}}
{{- $r := $lv.replica }}
{{- $gpu := eq $r.accelerator "gpu" }}
{{- $engine := default (dict) $lv.engine }}
{{- $vllm := eq (default "native" $engine.backend) "vllm" }}
{{- $v := default (dict) $engine.vllm }}
{{- if and (not $vllm) $v }}
{{- fail (printf "levante.engine.vllm: read only with levante.engine.backend vllm (backend is %q); set engine.backend: vllm or remove engine.vllm (%s)" (default "native" $engine.backend) (join ", " (keys $v | sortAlpha))) }}
{{- end }}
{{- $device := dig "model" "device" "" $engine }}
{{- if and $device $gpu (not (hasPrefix "cuda" $device)) }}
{{- fail (printf "levante.engine.model.device: %q contradicts levante.replica.accelerator gpu; leave it unset, or cuda" $device) }}
{{- end }}
{{- if and $device (not $gpu) (ne $device "cpu") }}
{{- fail (printf "levante.engine.model.device: %q needs levante.replica.accelerator gpu (a replica only sees the GPUs its placement group reserves)" $device) }}
{{- end }}

{{- /*
Capacity: every replica is one placement group of bundles {CPU: cpus_per_rank, GPU: 1} (gpu) or
{CPU: cpus_per_rank} (cpu), placed on worker pods only (the head and the front door offer no CPUs
or GPUs to Ray). Backend native: one bundle per expert-parallel rank, ep_size of them. Backend
vllm: one bundle per vLLM GPU worker, engine.vllm tensor x pipeline x data parallel sizes of them
(VllmConfig.world_size). A pod holds min(gpu, floor(cpu / cpus_per_rank)) bundles (gpu) or
floor(cpu / cpus_per_rank) (cpu).
*/}}
{{- $replicas := int $r.num_replicas }}
{{- $cpr := float64 $r.cpus_per_rank }}
{{- $ep := int $r.ep_size }}
{{- $perReplica := $ep }}
{{- $what := printf "ep_size %d" $ep }}
{{- $unit := "expert-parallel ranks" }}
{{- $short := "ranks" }}
{{- $perPodUnit := "rank(s)" }}
{{- $lower := "replica.ep_size" }}
{{- if $vllm }}
{{- if ne $ep 1 }}
{{- fail (printf "levante.replica.ep_size: must be 1 with levante.engine.backend vllm, got %d (vLLM splits the experts itself: set engine.vllm.tensor_parallel_size and engine.vllm.enable_expert_parallel)" $ep) }}
{{- end }}
{{- $tp := int (default 1 $v.tensor_parallel_size) }}
{{- $pp := int (default 1 $v.pipeline_parallel_size) }}
{{- $dp := int (default 1 $v.data_parallel_size) }}
{{- $perReplica = mul $tp $pp $dp }}
{{- if and (not $gpu) (gt $perReplica 1) }}
{{- fail (printf "levante.engine.vllm.tensor_parallel_size: tensor %d x pipeline %d x data %d parallel = %d devices per engine needs levante.replica.accelerator gpu" $tp $pp $dp $perReplica) }}
{{- end }}
{{- $what = printf "engine.vllm world size %d (tensor %d x pipeline %d x data %d parallel)" $perReplica $tp $pp $dp }}
{{- $unit = "vLLM workers" }}
{{- $short = "workers" }}
{{- $perPodUnit = "worker(s)" }}
{{- $lower = "engine.vllm.tensor_parallel_size / pipeline_parallel_size / data_parallel_size" }}
{{- end }}
{{- $need := mul $replicas $perReplica }}
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
{{- $packedGroups = add $packedGroups (mul (int .replicas) (div $perPod $perReplica)) }}
{{- $parts = append $parts (printf "%s: %d pod(s) x %d %s" .name (int .replicas) $perPod $perPodUnit) }}
{{- end }}
{{- $bundle := ternary (printf "one GPU and %v CPU each" $cpr) (printf "%v CPU each" $cpr) $gpu }}
{{- if lt $total $need }}
{{- fail (printf "levante.replica: %d replica(s) x %s = %d %s (%s), but rayCluster.workerGroups hold %d (%s); add worker pods, GPUs or CPUs, or lower replica.num_replicas or %s" $replicas $what $need $unit $bundle $total (join ", " $parts) $lower) }}
{{- end }}
{{- if and (eq $r.placement_strategy "STRICT_PACK") (lt $packedGroups $replicas) }}
{{- fail (printf "levante.replica.placement_strategy: STRICT_PACK puts all %d %s of a replica on one pod, but the worker pods fit only %d such replica(s) of the %d asked (%s)" $perReplica $short $packedGroups $replicas (join ", " $parts)) }}
{{- end }}
{{- if and (eq $r.placement_strategy "STRICT_SPREAD") (lt $podsWithRanks $perReplica) }}
{{- fail (printf "levante.replica.placement_strategy: STRICT_SPREAD puts each of a replica's %d %s on its own pod, but only %d worker pod(s) can hold one" $perReplica $short $podsWithRanks) }}
{{- end }}
{{- end }}
