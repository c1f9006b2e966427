{{/*
Names and labels of everything the chart creates. Every template takes its names and labels
from here, so a renamed release renames everything consistently.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "reranker-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-NAME, or RELEASE when it already contains the name; fullnameOverride wins. */}}
{{- define "reranker-operator.fullname" -}}
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

{{- define "reranker-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "reranker-operator.labels" -}}
helm.sh/chart: {{ include "reranker-operator.chart" . }}
{{ include "reranker-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: reranker-fleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pod's selector (stable across upgrades: never add to it). */}}
{{- define "reranker-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reranker-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component (redis, monitoring, macs) besides the operator itself. */}}
{{- define "reranker-operator.componentLabels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "reranker-operator.chart" $ctx }}
app.kubernetes.io/name: {{ include "reranker-operator.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: reranker-fleet
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "reranker-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reranker-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest. */}}
{{- define "reranker-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "reranker-operator.redisName" -}}
{{- printf "%s-redis" (include "reranker-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The namespaces the Macs' Role is created in. */}}
{{- define "reranker-operator.macNamespaces" -}}
{{- if .Values.macs.namespaces }}
{{- toJson .Values.macs.namespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}
