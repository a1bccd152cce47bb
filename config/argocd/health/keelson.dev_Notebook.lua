-- Argo CD health of a keelson.dev Notebook (resource.customizations.health.keelson.dev_Notebook).
-- Progressing until the operator has observed the current generation; Healthy when Ready is True;
-- Suspended while spec.suspend is true; Degraded for a spec the operator cannot build (phase
-- Failed) or a pod that needs a person (bad image, crash loop); Progressing otherwise.
local hs = {}

local function condition(type)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function describe(c, default)
  if c == nil then
    return default
  end
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

-- Container waiting reasons that need a person (crates/keelson-operator/src/podstatus.rs).
local stuck = {
  ImagePullBackOff = true,
  ErrImagePull = true,
  InvalidImageName = true,
  CrashLoopBackOff = true,
  CreateContainerConfigError = true,
  CreateContainerError = true,
  RunContainerError = true,
}

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end
if obj.status.phase == "Failed" or (ready ~= nil and stuck[ready.reason]) then
  hs.status = "Degraded"
  hs.message = describe(ready, "The notebook failed")
  return hs
end
if (obj.spec ~= nil and obj.spec.suspend == true) or obj.status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(ready, "The notebook is suspended")
  return hs
end
hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the notebook to become ready")
return hs
