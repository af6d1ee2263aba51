{{/* Names and labels. */}}
{{- define "airstate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "airstate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "airstate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "airstate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "airstate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "airstate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "airstate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "airstate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding Airflow's JWT secret: ours when created from a value, else an
existing one (by default the official Airflow chart's "<release>-jwt-secret"). */}}
{{- define "airstate.jwtSecretName" -}}
{{- if .Values.auth.jwtSecret.value }}
{{- printf "%s-jwt" (include "airstate.fullname" .) }}
{{- else }}
{{- default (printf "%s-jwt-secret" .Values.airflowReleaseName) .Values.auth.jwtSecret.existingSecret }}
{{- end }}
{{- end }}

{{/* The Secret holding the metastore URL (official Airflow chart: "<release>-airflow-metadata"). */}}
{{- define "airstate.metastoreSecretName" -}}
{{- if .Values.metastore.connection }}
{{- printf "%s-metastore" (include "airstate.fullname" .) }}
{{- else }}
{{- default (printf "%s-airflow-metadata" .Values.airflowReleaseName) .Values.metastore.existingSecret }}
{{- end }}
{{- end }}

{{/* AIRSTATE_REDIS_URL from url, sentinel or cluster settings; $(REDIS_PASSWORD) is
expanded by Kubernetes from the env var defined before it. */}}
{{- define "airstate.redisUrl" -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (ne .Values.redis.existingSecret "") }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls }}
{{- if .Values.redis.sentinel.hosts }}
{{- printf "%s-sentinel://%s%s/%s" $scheme $auth (join "," .Values.redis.sentinel.hosts) .Values.redis.sentinel.serviceName }}
{{- else if .Values.redis.cluster.nodes }}
{{- printf "%s-cluster://%s%s" $scheme $auth (join "," .Values.redis.cluster.nodes) }}
{{- else }}
{{- $url := .Values.redis.url }}
{{- if .Values.redis.tls }}{{- $url = replace "redis://" "rediss://" $url }}{{- end }}
{{- if $auth }}{{- $url = regexReplaceAll "^(rediss?://)" $url (printf "${1}%s" $auth) }}{{- end }}
{{- $url }}
{{- end }}
{{- end }}

{{/* Airflow's API server: forward.url, else the official chart's api-server Service. */}}
{{- define "airstate.airflowApiServerUrl" -}}
{{- if .Values.forward.url -}}
{{- .Values.forward.url -}}
{{- else -}}
{{- printf "http://%s-api-server:8080" .Values.airflowReleaseName -}}
{{- end -}}
{{- end -}}
