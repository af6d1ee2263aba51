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

{{/* The gateway's image: image.repository is required (no public image is published);
a digest pins it and wins over the tag. */}}
{{- define "airstate.image" -}}
{{- $repository := required "image.repository is required: no public airstate image is published. Build one from the repository's Dockerfile, push it to your registry and set image.repository (and image.tag or image.digest)" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Whether the pods read Airflow's JWT secret: not when a JWKS or a private signing key
is the trust source, unless a secret is named or given as well. */}}
{{- define "airstate.usesJwtSecret" -}}
{{- if or .Values.auth.jwtSecret.value .Values.auth.jwtSecret.existingSecret (not (or .Values.auth.trustedJwksUrl .Values.auth.privateKey.existingSecret)) }}true{{ end }}
{{- end }}

{{/* The OTLP collector's TCP port, for the NetworkPolicy: the port in otel.endpoint, else
the scheme's (80 or 443). */}}
{{- define "airstate.otelPort" -}}
{{- $url := urlParse .Values.otel.endpoint }}
{{- if regexMatch ":[0-9]+$" $url.host }}
{{- regexFind "[0-9]+$" $url.host }}
{{- else if eq $url.scheme "https" }}
{{- 443 }}
{{- else }}
{{- 80 }}
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

{{/* The metastore's TCP port, for the NetworkPolicy: metastore.port, else the port written
in metastore.connection, else PostgreSQL's 5432. A URL in an existing Secret cannot be read
at render time, so PgBouncer (6543 in the Airflow chart) needs metastore.port. */}}
{{- define "airstate.metastorePort" -}}
{{- if .Values.metastore.port }}
{{- .Values.metastore.port }}
{{- else if .Values.metastore.connection }}
{{- $host := (urlParse .Values.metastore.connection).host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- else }}
{{- 5432 }}
{{- end }}
{{- else }}
{{- 5432 }}
{{- end }}
{{- end }}

{{/* AIRSTATE_REDIS_URL from url, sentinel or cluster settings. The password never goes
into it here: it is AIRSTATE_REDIS_PASSWORD, which airstate percent-encodes itself (Kubernetes'
$(VAR) expansion would paste `p@ss#w/rd` in raw and move the host). */}}
{{- define "airstate.redisUrl" -}}
{{- $auth := "" }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls }}
{{- if .Values.redis.sentinel.hosts }}
{{- printf "%s-sentinel://%s%s/%s" $scheme $auth (join "," .Values.redis.sentinel.hosts) .Values.redis.sentinel.serviceName }}
{{- else if .Values.redis.cluster.nodes }}
{{- printf "%s-cluster://%s%s" $scheme $auth (join "," .Values.redis.cluster.nodes) }}
{{- else }}
{{- $url := .Values.redis.url }}
{{- if .Values.redis.tls }}{{- $url = replace "redis://" "rediss://" $url }}{{- end }}
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

{{/* The gateway's env entries (beside the ConfigMap), shared by the Deployment and the
`helm test` Pod, which mints its token from the same JWT settings. */}}
{{- define "airstate.env" -}}
{{- if .Values.redis.existingSecret }}
- name: AIRSTATE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretPasswordKey }}
{{- end }}
- name: AIRSTATE_REDIS_URL
  value: {{ include "airstate.redisUrl" . | quote }}
{{- if include "airstate.usesJwtSecret" . }}
- name: AIRFLOW__API_AUTH__JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "airstate.jwtSecretName" . }}
      key: {{ .Values.auth.jwtSecret.key }}
{{- end }}
{{- if eq .Values.identity.mode "metastore" }}
- name: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
  valueFrom:
    secretKeyRef:
      name: {{ include "airstate.metastoreSecretName" . }}
      key: {{ .Values.metastore.key }}
{{- end }}
{{- if .Values.admin.tokenSecret.existingSecret }}
- name: AIRSTATE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.admin.tokenSecret.existingSecret }}
      key: {{ .Values.admin.tokenSecret.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/* Labels of the `helm test` Pod: not the gateway's selector labels, so neither the
ReplicaSet adopts it nor the Service routes to it. */}}
{{- define "airstate.testLabels" -}}
app.kubernetes.io/name: {{ include "airstate.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}
