{{/*
Names. The RayService is named after "levante.fullname"; KubeRay names its head Service
"<RayService name>-head-svc" (GenerateHeadServiceName in ray-operator/controllers/ray/utils/util.go,
KubeRay v1.7.0) and derives cluster and pod names by adding suffixes, whose label values stop at
63 characters: hence 40 here.
*/}}
{{- define "levante.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 30 | trimSuffix "-" }}
{{- end }}

{{- define "levante.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "levante.frontdoorName" -}}
{{- printf "%s-frontdoor" (include "levante.fullname" .) }}
{{- end }}

{{/* The Ray GCS address of this release's RayService, as the front door's Ray node joins it. */}}
{{- define "levante.headService" -}}
{{- printf "%s-head-svc.%s.svc" (include "levante.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "levante.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "levante.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "levante.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
levante.io/region: {{ .Values.levante.region | quote }}
{{- end }}

{{/* Selector labels of one component: "frontdoor" or "ray" (the Ray head and worker pods). */}}
{{- define "levante.selectorLabels" -}}
app.kubernetes.io/name: {{ include "levante.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Ray node label on the head and the workers (KubeRay's group "labels": Ray node labels and pod
labels). The serveConfigV2 deployments select it, so Serve places the router and the engine
replicas on Ray pods and never on a front door's Ray node (which has no label and leaves with its pod).
*/}}
{{- define "levante.rayNodeLabelKey" -}}levante.io/role{{- end }}
{{- define "levante.rayNodeLabelValue" -}}ray{{- end }}

{{/* Where the front door finds its files. */}}
{{- define "levante.configDir" -}}/etc/levante{{- end }}
{{- define "levante.tlsDir" -}}/etc/levante/tls{{- end }}
{{- define "levante.clientCADir" -}}/etc/levante/client-ca{{- end }}
{{- define "levante.peerTLSDir" -}}/etc/levante/peer-tls{{- end }}

{{/*
The cluster config of this region (configs/README.md), as JSON: .Values.levante plus the keys
the chart owns. serveConfigV2 (args.config) and the front door's ConfigMap both use exactly this.
*/}}
{{- define "levante.clusterConfig" -}}
{{- $cfg := deepCopy .Values.levante }}
{{- $fd := deepCopy (default (dict) $cfg.frontdoor) }}
{{- $_ := set $fd "host" "0.0.0.0" }}
{{- /* http.port null in a values file removes the key (Helm): say null to the door too, or it takes 8000. */}}
{{- $http := deepCopy (default (dict) $fd.http) }}
{{- if not (hasKey $http "port") }}
{{- $_ := set $http "port" nil }}
{{- end }}
{{- $_ := set $fd "http" $http }}
{{- if .Values.tls.enabled }}
{{- $tls := dict "cert" (printf "%s/tls.crt" (include "levante.tlsDir" .)) "key" (printf "%s/tls.key" (include "levante.tlsDir" .)) }}
{{- if .Values.tls.clientCA.enabled }}
{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" (include "levante.clientCADir" .)) }}
{{- end }}
{{- $_ := set $fd "tls" $tls }}
{{- end }}
{{- $_ := set $cfg "frontdoor" $fd }}
{{- /* /metrics listens on every interface of the pod, like the door. */}}
{{- $tel := deepCopy (default (dict) $cfg.telemetry) }}
{{- $metrics := deepCopy (default (dict) $tel.metrics) }}
{{- $_ := set $metrics "host" "0.0.0.0" }}
{{- $_ := set $tel "metrics" $metrics }}
{{- $_ := set $cfg "telemetry" $tel }}
{{- /* "auto": the Ray cluster that the door's own Ray node joined (frontdoor-configmap.yaml, start.sh). */}}
{{- $_ := set $cfg "ray" (dict "address" "auto" "deploy" false) }}
{{- toJson $cfg }}
{{- end }}

{{/*
The Serve config KubeRay deploys (serveConfigV2). The deployment override replaces the code's
ray_actor_options as a whole (Serve's override_deployment_info), hence the replica's own resources
again, as cluster/serve/app.py sets them: it is rank 0, in bundle 0 of its placement group, with
cpus_per_rank CPUs and its bundle's GPU unless vLLM's workers take the GPUs (world size > 1), and
its runtime_env (REPLICA_ENV: user code on the replica's own event loop).
*/}}
{{- define "levante.serveConfig" -}}
{{- $cfg := include "levante.clusterConfig" . | fromJson }}
{{- $r := $cfg.replica }}
{{- $e := $cfg.engine }}
{{- $world := 1 }}
{{- if eq (default "native" $e.backend) "vllm" }}
{{- $v := default (dict) $e.vllm }}
{{- $world = mul (int (default 1 $v.tensor_parallel_size)) (int (default 1 $v.pipeline_parallel_size)) (int (default 1 $v.data_parallel_size)) }}
{{- end }}
{{- $gpus := 0 }}
{{- if and (eq (default "cpu" $r.accelerator) "gpu") (eq (int $world) 1) }}
{{- $gpus = 1 }}
{{- end }}
{{- $cpus := 1.0 }}
{{- if hasKey $r "cpus_per_rank" }}
{{- $cpus = float64 $r.cpus_per_rank }}
{{- end }}
{{- $selector := dict (include "levante.rayNodeLabelKey" .) (include "levante.rayNodeLabelValue" .) }}
{{- $env := dict "env_vars" (dict "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" "0") }}
{{- $actor := dict "num_cpus" $cpus "num_gpus" $gpus "label_selector" $selector "runtime_env" $env }}
{{- $app := dict "name" (printf "levante-%s" .Values.levante.region) "import_path" "cluster.serve.app:app_builder" "route_prefix" nil "args" (dict "config" $cfg) }}
{{- $_ := set $app "deployments" (list (dict "name" "EngineReplica" "ray_actor_options" $actor)) }}
{{- $serve := dict "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) }}
{{- toYaml $serve }}
{{- end }}

{{/* The front door's /metrics: on when levante.telemetry.metrics.enabled ("true" or ""), and its port. */}}
{{- define "levante.metricsEnabled" -}}
{{- if dig "telemetry" "metrics" "enabled" false .Values.levante }}true{{- end }}
{{- end }}
{{- define "levante.metricsPort" -}}
{{- int (dig "telemetry" "metrics" "port" 9464 .Values.levante) }}
{{- end }}

{{/* The front door's OpenAI-compatible HTTP port (levante.frontdoor.http.port); "" when HTTP is off (null). */}}
{{- define "levante.httpPort" -}}
{{- with dig "frontdoor" "http" "port" nil .Values.levante }}{{ int . }}{{- end }}
{{- end }}

{{/* Front door probe handler (frontdoor.probes.handler); see values.yaml. */}}
{{- define "levante.probeHandler" -}}
{{- if eq .Values.frontdoor.probes.handler "grpc" }}
grpc:
  port: {{ int .Values.levante.frontdoor.port }}
  service: ""
  {{- if .Values.tls.enabled }}
  mode: TLS
  {{- end }}
{{- else }}
tcpSocket:
  port: grpc
{{- end }}
{{- end }}
