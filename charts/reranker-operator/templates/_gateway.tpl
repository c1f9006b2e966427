{{/*
Names of the gateway's objects (gateway.yaml, gateway-rbac.yaml).
*/}}

{{- define "reranker-operator.gatewayName" -}}
{{- printf "%s-gateway" (include "reranker-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The gateway pods' selector (stable across upgrades: never add to it). Its own
app.kubernetes.io/name, so that the operator's selector (name and instance) never matches a
gateway pod (`kubectl logs deployment/OPERATOR` must not land on one). */}}
{{- define "reranker-operator.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "reranker-operator.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels of every gateway object. */}}
{{- define "reranker-operator.gatewayLabels" -}}
helm.sh/chart: {{ include "reranker-operator.chart" . }}
{{ include "reranker-operator.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: reranker-fleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "reranker-operator.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "reranker-operator.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest (the tag defaults to the operator image's). */}}
{{- define "reranker-operator.gatewayImage" -}}
{{- with .Values.gateway.image }}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (default (default $.Chart.AppVersion $.Values.image.tag) .tag) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The namespaces whose fleets the gateway sees, as a JSON list: gateway.namespaces, else the
operator's watchNamespaces; empty: the whole cluster. */}}
{{- define "reranker-operator.gatewayNamespaces" -}}
{{- toJson (default .Values.watchNamespaces .Values.gateway.namespaces | default list) }}
{{- end }}
