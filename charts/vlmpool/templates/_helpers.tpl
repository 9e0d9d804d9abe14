{{/* Names. */}}
{{- define "vlmpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vlmpool.fullname" -}}
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

{{- define "vlmpool.operatorName" -}}
{{- printf "%s-operator" (include "vlmpool.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vlmpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vlmpool.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels. The operator's own pods are component=operator: the operator watches only pods
     labelled managed-by=vlmpool-operator,component=server (the pools'), never these. */}}
{{- define "vlmpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vlmpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vlmpool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "vlmpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vlmpool
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the chart's appVersion. */}}
{{- define "vlmpool.image" -}}
{{- $img := index . 0 }}{{- $root := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* The operator's --network-policy: the rules of the NetworkPolicy it gives every pool (admin port:
     the operator's pods in the release namespace only; http port: httpFrom or anyone; extraIngress). */}}
{{- define "vlmpool.networkPolicyJson" -}}
{{- $admin := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "vlmpool.selectorLabels" . | fromYaml)) }}
{{- dict "adminFrom" (list $admin) "httpFrom" .Values.networkPolicy.httpFrom "extraIngress" .Values.networkPolicy.extraIngress | toJson }}
{{- end }}
