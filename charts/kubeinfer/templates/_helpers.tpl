{{/*
Names. The chart name is "kubeinfer"; every object is prefixed with the release's full name, and
the two components get "-operator" / "-gateway" (the full name is cut to leave room for them).
*/}}
{{- define "kubeinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubeinfer.fullname" -}}
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

{{- define "kubeinfer.operator.fullname" -}}
{{- printf "%s-operator" (include "kubeinfer.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "kubeinfer.gateway.fullname" -}}
{{- printf "%s-gateway" (include "kubeinfer.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "kubeinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "kubeinfer.labels" -}}
helm.sh/chart: {{ include "kubeinfer.chart" . }}
{{ include "kubeinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeinfer
{{- end }}

{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component labels; call with (dict "ctx" $ "component" "operator").
The component label keeps the chart's pods apart from the model pods, which the operator labels
app.kubernetes.io/name=kubeinfer too, but with app.kubernetes.io/component=model-server.
*/}}
{{- define "kubeinfer.componentLabels" -}}
{{ include "kubeinfer.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kubeinfer.componentSelectorLabels" -}}
{{ include "kubeinfer.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The kubeinfer image (operator and gateway run the same image with different commands).
An empty image.registry gives "kubeinfer/kubeinfer:<tag>" with no host, i.e. the runtime's default.
*/}}
{{- define "kubeinfer.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- if .Values.image.digest -}}
{{- $ref = printf "%s@%s" $ref .Values.image.digest -}}
{{- end -}}
{{- if .Values.image.registry -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.image.registry) $ref -}}
{{- else -}}
{{- $ref -}}
{{- end -}}
{{- end }}

{{- define "kubeinfer.operator.serviceAccountName" -}}
{{- include "kubeinfer.operator.fullname" . }}
{{- end }}

{{- define "kubeinfer.gateway.serviceAccountName" -}}
{{- include "kubeinfer.gateway.fullname" . }}
{{- end }}

{{/*
The operator's configuration file (the format of operator/kubeinfer/config/defaults.yaml, read by
kubeinfer.render.config.load_config): operator.config plus the engine images from engines.images, and the kubeinfer image itself
(the weight cache's download Jobs run it).
*/}}
{{- define "kubeinfer.operator.configFile" -}}
{{- $config := deepCopy .Values.operator.config -}}
{{- $images := deepCopy .Values.engines.images -}}
{{- $_ := set $images "kubeinfer" (include "kubeinfer.image" .) -}}
{{- $_ := set $config "images" $images -}}
{{- toYaml $config }}
{{- end }}
