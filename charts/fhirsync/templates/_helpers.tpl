{{- define "fhirsync.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fhirsync.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fhirsync.labels" -}}
app.kubernetes.io/name: {{ include "fhirsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "fhirsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fhirsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fhirsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fhirsync.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fhirsync.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* The rules the controllers use, and nothing more. */}}
{{- define "fhirsync.rules" -}}
- apiGroups: [fhirsync.io]
  resources: [bulkexportsyncs, fhirsubscriptionsyncs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [fhirsync.io]
  resources: [bulkexportruns]
  verbs: [get, list, watch, create, delete, patch, update]
- apiGroups: [fhirsync.io]
  resources: [bulkexportsyncs/status, bulkexportruns/status, fhirsubscriptionsyncs/status]
  verbs: [get, patch, update]
- apiGroups: [fhirsync.io]
  resources: [bulkexportsyncs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* The receiver's base URL as sources reach it. */}}
{{- define "fhirsync.receiverUrl" -}}
{{- if .Values.receiver.url -}}
{{- .Values.receiver.url -}}
{{- else if .Values.receiver.ingress.enabled -}}
https://{{ required "receiver.ingress.host is required when receiver.ingress.enabled" .Values.receiver.ingress.host }}
{{- else -}}
{{- if .Values.receiver.tls.secretName }}https{{ else }}http{{ end }}://{{ include "fhirsync.fullname" . }}-receiver.{{ .Release.Namespace }}.svc:{{ .Values.receiver.port }}
{{- end -}}
{{- end -}}

{{/* The Secret holding the relay key. */}}
{{- define "fhirsync.relayKeySecret" -}}
{{- .Values.receiver.keySecret.existingSecret | default (printf "%s-relay-key" (include "fhirsync.fullname" .)) -}}
{{- end -}}
