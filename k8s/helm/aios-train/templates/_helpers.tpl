{{/* ---- Names and labels ------------------------------------------------------------------------- */}}

{{- define "aios-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayJob's name. KubeRay appends 6 characters for its RayCluster, whose name may have 53: 47 at most. */}}
{{- define "aios-train.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "aios-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aios-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aios-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aios-train.labels" -}}
helm.sh/chart: {{ include "aios-train.chart" . }}
{{ include "aios-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "aios-train.runName" -}}
{{- default (include "aios-train.fullname" .) .Values.job.runName -}}
{{- end -}}

{{- define "aios-train.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}

{{- define "aios-train.minioName" -}}
{{- printf "%s-minio" (include "aios-train.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The S3 endpoint: s3.endpointUrl, else the in-chart MinIO's Service when enabled, else "" (AWS). */}}
{{- define "aios-train.s3Endpoint" -}}
{{- if .Values.s3.endpointUrl -}}
{{- .Values.s3.endpointUrl -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "aios-train.minioName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* --world-size: N when the worker group has a fixed size, MIN-MAX (elastic) otherwise. */}}
{{- define "aios-train.worldSize" -}}
{{- $min := int .Values.workers.minReplicas -}}
{{- $max := int .Values.workers.maxReplicas -}}
{{- if eq $min $max -}}{{ $min }}{{- else -}}{{ printf "%d-%d" $min $max }}{{- end -}}
{{- end -}}

{{- define "aios-train.elastic" -}}
{{- if lt (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas) -}}true{{- end -}}
{{- end -}}

{{/* ---- Shell-safe arguments ---------------------------------------------------------------------- */}}

{{/* One argument for a shell command line (KubeRay runs the entrypoint with a shell): as it is when it holds
     only safe characters, else in single quotes with each ' written as '\''. */}}
{{- define "aios-train.shellQuote" -}}
{{- $s := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $s -}}
{{- $s -}}
{{- else -}}
{{- printf "'%s'" (replace "'" "'\\''" $s) -}}
{{- end -}}
{{- end -}}

{{/* A value as the CLI reads it: whole numbers (which JSON values carry as floats) without a fraction. */}}
{{- define "aios-train.argValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) (lt . 1e15) (gt . -1e15) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The flags the chart sets itself (or refuses), and the fix to name when a user passes one. */}}
{{- define "aios-train.managedFlags" -}}
{{- dict
  "run-name" "set job.runName instead"
  "world-size" "set workers.minReplicas and workers.maxReplicas instead"
  "cpus-per-worker" "set workers.cpus instead"
  "storage-path" "set train.storagePath instead"
  "bundle-dir" "set train.bundleDir instead"
  "s3-endpoint-url" "set s3.endpointUrl instead"
  "ray-address" "drop it: the job attaches to its own cluster through $RAY_ADDRESS"
  "launcher" "drop it: the job is a Ray Train job (--launcher ray)"
  "cuda-ids" "drop it: each worker pod has its own GPU (workers.gpus)"
  "log-file" "drop it: metrics go to metrics.jsonl in the bundle, and a path on the head's disk would keep the workers on the head"
  "stop-file" "drop it: stop the run with kubectl delete rayjob; a path on the head's disk would keep the workers on the head"
  "config" "set train.config instead"
  "model" "set train.model instead"
  "dataset-file" "set train.datasetFile instead"
  "eval-file" "set train.evalFile instead"
  "brain-name" "set train.brainName instead"
  "steps" "set train.steps instead"
  "max-failures" "set train.maxFailures instead"
  "device" "set train.device instead"
  "progress" "set train.progress instead"
  | toJson -}}
{{- end -}}

{{/* The train-actv1 arguments, as a JSON list (unquoted). */}}
{{- define "aios-train.trainArgs" -}}
{{- $t := .Values.train -}}
{{- $args := list -}}
{{- range $pair := list (list "config" $t.config) (list "model" $t.model) (list "dataset-file" $t.datasetFile) (list "eval-file" $t.evalFile) (list "brain-name" $t.brainName) (list "steps" $t.steps) -}}
{{- $value := index $pair 1 -}}
{{- if and (not (kindIs "invalid" $value)) (ne (toString $value) "") -}}
{{- $args = concat $args (list (printf "--%s" (index $pair 0)) (include "aios-train.argValue" $value)) -}}
{{- end -}}
{{- end -}}
{{- if $t.storagePath -}}{{- $args = concat $args (list "--storage-path" $t.storagePath) -}}{{- end -}}
{{- if $t.bundleDir -}}{{- $args = concat $args (list "--bundle-dir" $t.bundleDir) -}}{{- end -}}
{{- $endpoint := include "aios-train.s3Endpoint" . -}}
{{- if $endpoint -}}{{- $args = concat $args (list "--s3-endpoint-url" $endpoint) -}}{{- end -}}
{{- $args = concat $args (list "--world-size" (include "aios-train.worldSize" .) "--cpus-per-worker" (include "aios-train.argValue" .Values.workers.cpus)) -}}
{{- if not (kindIs "invalid" $t.maxFailures) -}}
{{- $args = concat $args (list "--max-failures" (include "aios-train.argValue" $t.maxFailures)) -}}
{{- end -}}
{{- if $t.device -}}{{- $args = concat $args (list "--device" $t.device) -}}{{- end -}}
{{- if kindIs "bool" $t.progress -}}
{{- $args = append $args (ternary "--progress" "--no-progress" $t.progress) -}}
{{- end -}}
{{- range $name, $value := $t.flags -}}
{{- if kindIs "bool" $value -}}
{{- $args = append $args (printf "--%s%s" (ternary "" "no-" $value) $name) -}}
{{- else if not (kindIs "invalid" $value) -}}
{{- $args = concat $args (list (printf "--%s" $name) (include "aios-train.argValue" $value)) -}}
{{- end -}}
{{- end -}}
{{- range $t.extraArgs -}}
{{- $args = append $args (toString .) -}}
{{- end -}}
{{- $args = concat $args (list "--run-name" (include "aios-train.runName" .)) -}}
{{- toJson $args -}}
{{- end -}}

{{/* spec.entrypoint: one shell command line. */}}
{{- define "aios-train.entrypoint" -}}
{{- $quoted := list -}}
{{- range (include "aios-train.trainArgs" . | fromJsonArray) -}}
{{- $quoted = append $quoted (include "aios-train.shellQuote" .) -}}
{{- end -}}
{{- printf "aios hrm-hf train-actv1 %s" (join " " $quoted) -}}
{{- end -}}

{{/* ---- Environment shared by every Ray container ------------------------------------------------- */}}

{{- define "aios-train.env" -}}
{{- $endpoint := include "aios-train.s3Endpoint" . -}}
{{- if $endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $endpoint | quote }}
{{- end }}
{{- if .Values.s3.region }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "aios-train.envFrom" -}}
{{- if .Values.s3.secretName }}
envFrom:
  - secretRef:
      name: {{ .Values.s3.secretName | quote }}
{{- end }}
{{- end -}}

{{/* ---- Checks: bad values stop the render with one message that names the value and the fix ------- */}}

{{- define "aios-train.validate" -}}
{{- $name := include "aios-train.fullname" . -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "the RayJob's name %q must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most 47 characters): pick another release name or set fullnameOverride" $name) -}}
{{- end -}}
{{- $min := int .Values.workers.minReplicas -}}
{{- $max := int .Values.workers.maxReplicas -}}
{{- if gt $min $max -}}
{{- fail (printf "workers.minReplicas (%d) is greater than workers.maxReplicas (%d): --world-size MIN-MAX needs MIN <= MAX; set minReplicas == maxReplicas for a fixed --world-size" $min $max) -}}
{{- end -}}
{{- $run := include "aios-train.runName" . -}}
{{- if not (regexMatch "^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$" $run) -}}
{{- fail (printf "job.runName %q is not a plain name (--run-name): use up to 128 letters, digits, '.', '_' and '-', not starting with '.' or '-'" $run) -}}
{{- end -}}
{{- if not .Values.train.allowLocalStorage -}}
{{- range $key := list "storagePath" "bundleDir" -}}
{{- $value := toString (index $.Values.train $key) -}}
{{- if not (hasPrefix "s3://" $value) -}}
{{- fail (printf "train.%s %q is not an s3:// location: the workers run on other pods than the driver (the head) and a retried job starts on a new cluster, so checkpoints and bundle must be in S3 (or MinIO: minio.enabled); set train.allowLocalStorage: true to keep them on the head's disk" $key $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq (int .Values.workers.gpus) 0) (eq (toString .Values.train.device) "cuda") -}}
{{- fail "train.device is cuda but workers.gpus is 0: give the workers a GPU (workers.gpus: 1) or set train.device: cpu" -}}
{{- end -}}
{{- $managed := include "aios-train.managedFlags" . | fromJson -}}
{{- range $flag, $_ := .Values.train.flags -}}
{{- if hasKey $managed $flag -}}
{{- fail (printf "train.flags.%s: the chart manages --%s; %s" $flag $flag (index $managed $flag)) -}}
{{- end -}}
{{- if hasPrefix "no-" $flag -}}
{{- fail (printf "train.flags.%s: write the flag's name without no- and the value false (%s: false)" $flag (trimPrefix "no-" $flag)) -}}
{{- end -}}
{{- end -}}
{{- range .Values.train.extraArgs -}}
{{- $arg := toString . -}}
{{- if hasPrefix "--" $arg -}}
{{- $flag := trimPrefix "--" (first (splitList "=" $arg)) -}}
{{- $flag = ternary (trimPrefix "no-" $flag) $flag (hasKey $managed (trimPrefix "no-" $flag)) -}}
{{- if hasKey $managed $flag -}}
{{- fail (printf "train.extraArgs: %s: the chart manages this flag; %s" $arg (index $managed $flag)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range .Values.env -}}
{{- if and (regexMatch "(?i)(KEY|SECRET|TOKEN|PASSW|CREDENTIAL)" (toString .name)) (hasKey . "value") -}}
{{- fail (printf "env %s has a literal value and looks like a credential: put it in the Secret s3.secretName (loaded with envFrom) or use valueFrom.secretKeyRef" .name) -}}
{{- end -}}
{{- end -}}
{{- if .Values.minio.enabled -}}
{{- if not .Values.s3.secretName -}}
{{- fail "minio.enabled needs s3.secretName: MinIO's root user and password are that Secret's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" -}}
{{- end -}}
{{- $bucket := printf "s3://%s" .Values.minio.bucket -}}
{{- range $key := list "storagePath" "bundleDir" -}}
{{- $value := toString (index $.Values.train $key) -}}
{{- if and (hasPrefix "s3://" $value) (ne $value $bucket) (not (hasPrefix (printf "%s/" $bucket) $value)) -}}
{{- fail (printf "train.%s %q is not in the MinIO bucket %s the chart creates (minio.bucket): use %s/..." $key $value $bucket $bucket) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
